"""Every change this predictor makes to KServe's own code, in one place, and the checks that they still fit.

Written for kserve 0.21.0 (`WRITTEN_FOR`). Each patch is here because KServe offers no setting for it:

- `before_kserve_import`: /docs on unless turned off (KServe builds its app from `sys.argv` at import
  time, /docs off by default), and Prometheus' multiprocess directory with `--workers N`
  (prometheus_client picks its storage when kserve first imports it);
- `configure_uvicorn`: uvicorn's proxy-header rewriting off in every RESTServer (KServe builds
  uvicorn's Config and does not expose `proxy_headers`; predictor.core.security decides the
  client), and its access log as `--request_log` says (KServe leaves it on);
- `use_grpc_server`: KServe's ModelServer builds the given gRPC server class (ours:
  predictor.serving.grpc_server.GuardedGRPCServer, the HTTP gates on gRPC, no model repository API)
  instead of its GRPCServer;
- `use_patient_workers`: with `--workers N`, each worker process runs a given hook on its model
  before KServe's routes are added (ours installs the app), and may take 60 s instead of 5 s to
  answer KServe's liveness ping;
- `without_timing_log`: KServe's TimingMiddleware off the app. Its only output is two `kserve.trace`
  log lines per request (wall and CPU seconds, the route found by matching every route again), which
  `api_request_latency_seconds` already measures; it cost 4 % of the server's time per call;
- `use_orjson_response`: KServe's JSON answers (its app's default response class, its v1 handlers')
  as OrjsonResponse, the same bytes, instead of FastAPI's ORJSONResponse, deprecated since FastAPI
  0.165: a warning in the log of every process at its first answers.

`problems()` checks what these patches rely on (names, signatures, attributes KServe's code sets);
`check_installed()` stops the server with one line per broken assumption when an upgrade breaks one,
instead of serving without a gate. tests/test_kserve_compat.py holds both to the installed kserve.
It imports nothing of this package: what it installs is handed to it.
"""

import argparse
import atexit
import inspect
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from importlib import metadata

import orjson
from starlette.responses import JSONResponse

WRITTEN_FOR = "0.21.0"
WORKER_ANSWER_TIMEOUT_S = 60.0


class IncompatibleKServe(RuntimeError):
    """The installed kserve no longer fits what this module patches."""


def before_kserve_import() -> None:
    """Call before anything imports kserve (predictor.__main__ does, first thing)."""
    if not any(a.startswith("--enable_docs_url") for a in sys.argv):
        sys.argv[1:1] = ["--enable_docs_url", "true"]  # spawned workers inherit sys.argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--workers", type=int, default=1)
    if pre.parse_known_args()[0].workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Workers are spawned with this environment; the directory goes when the server process ends.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="predictor-metrics-")
        atexit.register(shutil.rmtree, os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def configure_uvicorn(access_log: bool) -> None:
    """Turn off uvicorn's proxy-header handling in the servers KServe builds (workers included), and
    its access log unless `access_log`.

    Uvicorn rewrites the client address from X-Forwarded-For for peers in FORWARDED_ALLOW_IPS
    (127.0.0.1 by default: every caller behind a local proxy such as Knative's queue-proxy), before
    any middleware runs; the guard would then count whatever address a caller wrote. So it is
    switched off on the Config of every RESTServer (spawned workers receive that Config pickled).
    Uvicorn logs a request when its `uvicorn.access` logger has handlers, which KServe's logging
    configuration gives it (again in each worker process): they are removed after each configuration.
    """
    from kserve import logging as kserve_logging
    from kserve.protocol.rest import server as rest

    original = getattr(rest.RESTServer.__init__, "__wrapped__", rest.RESTServer.__init__)

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.config.proxy_headers = False

    init.__wrapped__ = original
    rest.RESTServer.__init__ = init

    configure = getattr(kserve_logging.configure_logging, "__wrapped__", kserve_logging.configure_logging)

    def configure_logging(*args, **kwargs):
        configure(*args, **kwargs)
        if not access_log:
            _silence_access_log()

    configure_logging.__wrapped__ = configure
    kserve_logging.configure_logging = configure_logging


def _silence_access_log() -> None:
    access = logging.getLogger("uvicorn.access")
    access.handlers = []
    access.propagate = False


def use_grpc_server(server_class: type) -> None:
    """Make KServe's ModelServer start `server_class` (a subclass of its GRPCServer) for `--enable_grpc true`."""
    from kserve import model_server

    model_server.GRPCServer = server_class


def use_patient_workers(on_worker_start: Callable) -> None:
    """Make KServe's multi-process server start and watch its workers as PatientWorkerProcess, each of
    which calls `on_worker_start(model)` for its unpickled model before serving. The hook travels to
    the spawned process pickled, by reference: it must be a module-level function."""
    from kserve.protocol.rest.multiprocess import server as multiprocess

    worker_class = _patient_worker_process()
    worker_class.on_worker_start = staticmethod(on_worker_start)
    multiprocess.RESTServerProcess = worker_class


def _patient_worker_process() -> type:
    from kserve.protocol.rest.multiprocess import server as multiprocess

    base = multiprocess.RESTServerProcess
    if getattr(base, "patient", False):
        return base

    class PatientWorkerProcess(base):
        """A KServe worker process that runs `on_worker_start` on its model first (KServe spawns each
        worker with the model pickled and has it import `kserve.model_server.app` by name) and whose
        liveness ping may take WORKER_ANSWER_TIMEOUT_S: a spawned worker answers only once it has
        imported its libraries and unpickled the model, which takes longer than KServe's 5 s on a busy
        2-core node; KServe would kill it and start another, forever."""

        patient = True
        on_worker_start: Callable | None = None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # An instance attribute, so that it is pickled into the spawned process with the rest.
            self._on_worker_start = type(self).on_worker_start

        def is_alive(self, timeout: float = WORKER_ANSWER_TIMEOUT_S) -> bool:
            return super().is_alive(timeout)

        def target(self, *args, **kwargs):
            # Runs in the worker process: the REST server it is about to run holds the unpickled model.
            rest_server = self._real_target.__self__
            if self._on_worker_start is not None:
                for model in rest_server.dataplane.model_registry.get_models().values():
                    self._on_worker_start(model)
            return super().target(*args, **kwargs)

    PatientWorkerProcess.__module__, PatientWorkerProcess.__qualname__ = __name__, "PatientWorkerProcess"
    globals()["PatientWorkerProcess"] = PatientWorkerProcess
    return PatientWorkerProcess


def without_timing_log(app) -> None:
    """Remove KServe's TimingMiddleware from `app` (before Starlette builds its middleware stack)."""
    from timing_asgi import TimingMiddleware

    app.user_middleware = [m for m in app.user_middleware if m.cls is not TimingMiddleware]


class OrjsonResponse(JSONResponse):
    """FastAPI's ORJSONResponse without its deprecation warning: JSON by orjson, numpy values and
    non-string keys included, as KServe's answers have always been written."""

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)


def use_orjson_response(app) -> None:
    """Answer with OrjsonResponse wherever KServe answers with FastAPI's ORJSONResponse: `app`'s default
    response class (call before any route is added: KServe adds its own when the server starts) and
    the name in KServe's modules loaded by now (its OpenAI routes' module loads, if ever, only to serve an
    OpenAI model: this predictor serves none)."""
    from fastapi import responses

    app.router.default_response_class = OrjsonResponse
    for name, module in list(sys.modules.items()):
        if name.startswith("kserve.") and getattr(module, "ORJSONResponse", None) is responses.ORJSONResponse:
            module.ORJSONResponse = OrjsonResponse


def __getattr__(name: str):
    # The worker class subclasses KServe's, so it is made only once kserve may be imported (after
    # before_kserve_import); a spawned worker unpickling it by name gets it made here on first lookup.
    if name == "PatientWorkerProcess":
        return _patient_worker_process()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _source(obj) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def problems() -> list[str]:
    """What no longer holds in the installed kserve of what the patches above assume (empty: all holds)."""
    from fastapi import responses
    from kserve import model_server
    from kserve.protocol.grpc import server as grpc_server
    from kserve.protocol.rest import server as rest
    from kserve.protocol.rest import v1_endpoints
    from kserve.protocol.rest.multiprocess import server as multiprocess

    found = []

    def expect(condition: bool, what: str) -> None:
        if not condition:
            found.append(what)

    expect(any(getattr(a, "dest", None) == "enable_docs_url" for a in getattr(model_server.parser, "_actions", ())),
           "kserve.model_server.parser has no --enable_docs_url (before_kserve_import)")
    expect(hasattr(model_server, "app"), "kserve.model_server.app is gone (use_patient_workers installs on it)")
    init = getattr(rest.RESTServer.__init__, "__wrapped__", rest.RESTServer.__init__)
    expect("self.config" in _source(init),
           "RESTServer.__init__ no longer sets self.config, the uvicorn Config (configure_uvicorn)")
    expect(hasattr(model_server, "GRPCServer") and "GRPCServer(" in _source(model_server.ModelServer),
           "ModelServer no longer builds its gRPC server as model_server.GRPCServer (use_grpc_server)")
    grpc_init = _source(grpc_server.GRPCServer.__init__)
    expect(all(f"self.{name}" in grpc_init for name in ("_data_plane", "_model_repository_extension", "_port", "_kwargs")),
           "GRPCServer.__init__ no longer keeps _data_plane, _model_repository_extension, _port, _kwargs (GuardedGRPCServer)")
    expect(list(inspect.signature(grpc_server.GRPCServer.start).parameters) == ["self", "max_workers"],
           "GRPCServer.start(max_workers) changed (GuardedGRPCServer overrides it)")
    expect("logging.configure_logging(" in _source(multiprocess),
           "KServe's worker no longer configures logging through kserve.logging.configure_logging (configure_uvicorn)")
    expect("TimingMiddleware" in _source(rest.RESTServer._add_middlewares),
           "RESTServer._add_middlewares no longer adds timing_asgi's TimingMiddleware (without_timing_log)")
    process = getattr(multiprocess, "RESTServerProcess", None)
    expect(process is not None and "timeout" in inspect.signature(process.is_alive).parameters,
           "RESTServerProcess.is_alive(timeout) is gone (use_patient_workers)")
    expect(process is not None and callable(getattr(process, "target", None)) and "_real_target" in _source(multiprocess),
           "RESTServerProcess no longer runs its server through target/_real_target (use_patient_workers)")
    expect(not hasattr(model_server, "app")  # reported above
           or model_server.app.router.default_response_class in (responses.ORJSONResponse, OrjsonResponse),
           "KServe's app no longer answers with FastAPI's ORJSONResponse by default (use_orjson_response)")
    expect(getattr(v1_endpoints, "ORJSONResponse", None) in (responses.ORJSONResponse, OrjsonResponse)
           and "ORJSONResponse(" in _source(v1_endpoints),
           "kserve.protocol.rest.v1_endpoints no longer answers with ORJSONResponse by that name (use_orjson_response)")
    return found


def check_installed() -> None:
    """Raise IncompatibleKServe, naming the installed version and each broken assumption, if any."""
    broken = problems()
    if broken:
        raise IncompatibleKServe(f"kserve {metadata.version('kserve')} is installed; predictor.serving.kserve_compat was "
                                 f"written for {WRITTEN_FOR} and these no longer hold: {'; '.join(broken)}")
