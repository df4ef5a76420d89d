"""Every change this predictor makes to KServe's own code, in one place, and the checks that they still fit.

Written for kserve 0.21.0 (`WRITTEN_FOR`). Each patch is here because KServe offers no setting for it:

- `before_kserve_import`: /docs on unless turned off (KServe builds its app from `sys.argv` at import
  time, /docs off by default), and Prometheus' multiprocess directory with `--workers N`
  (prometheus_client picks its storage when kserve first imports it);
- `configure_uvicorn`: uvicorn's proxy-header rewriting off in every RESTServer (KServe builds
  uvicorn's Config and does not expose `proxy_headers`; predictor.core.security decides the
  client), its access log as `--request_log` says (KServe leaves it on), and its HTTP protocol
  `LimitedHttpProtocol`: connection limits uvicorn lacks (a deadline for a request's head, a bound
  on its size, the idle timeout from the first byte, a bound on open connections), and a front door
  (`use_front_door`): a request refused from its head alone is answered by the protocol itself, with
  no ASGI task, framework or routing;
- `use_grpc_server`: KServe's ModelServer builds the given gRPC server class (ours:
  predictor.serving.grpc_server.GuardedGRPCServer, the HTTP gates on gRPC, no model repository API)
  instead of its GRPCServer;
- `use_patient_workers`: with `--workers N`, the worker processes are forked (not spawned) from the
  server process, each runs a given hook on its model before KServe's routes are added (ours
  installs the app), and may take 60 s instead of 5 s to answer KServe's liveness ping;
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
import functools
import inspect
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

import orjson
from starlette.responses import JSONResponse

WRITTEN_FOR = "0.21.0"
WORKER_ANSWER_TIMEOUT_S = 60.0


class IncompatibleKServe(RuntimeError):
    """The installed kserve no longer fits what this module patches."""


def before_kserve_import(default_workers: int = 1) -> None:
    """Call before anything imports kserve (predictor.__main__ does, first thing). `default_workers`: the
    `--workers` (env WORKERS) when neither is given (KServe's own default is 1)."""
    if not any(a.startswith("--enable_docs_url") for a in sys.argv):
        sys.argv[1:1] = ["--enable_docs_url", "true"]  # spawned workers inherit sys.argv
    if not any(a.startswith("--workers") for a in sys.argv):
        # KServe parses sys.argv itself, at import: the default is decided there.
        sys.argv[1:1] = ["--workers", os.environ.get("WORKERS") or str(default_workers)]
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--workers", type=int, default=1)
    if pre.parse_known_args()[0].workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Workers are spawned with this environment; the directory goes when the server process ends.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="predictor-metrics-")
        atexit.register(shutil.rmtree, os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


@dataclass(frozen=True)
class ConnectionLimits:
    """What `LimitedHttpProtocol` enforces on every HTTP connection of a process."""

    header_timeout_s: float  # from a request's first byte to the end of its head; then 408 and close
    max_header_bytes: int  # request line plus headers; beyond it 431 and close
    max_connections: int  # open connections; beyond it the longest idle one is closed, or the new one refused


def configure_uvicorn(access_log: bool, limits: ConnectionLimits | None = None) -> None:
    """Turn off uvicorn's proxy-header handling in the servers KServe builds (workers included), its
    access log unless `access_log`, and serve HTTP with `LimitedHttpProtocol` under `limits`.

    Uvicorn rewrites the client address from X-Forwarded-For for peers in FORWARDED_ALLOW_IPS
    (127.0.0.1 by default: every caller behind a local proxy such as Knative's queue-proxy), before
    any middleware runs; the guard would then count whatever address a caller wrote. So it is
    switched off on the Config of every RESTServer (spawned workers receive that Config pickled, the
    protocol and its limits with it). Uvicorn logs a request when its `uvicorn.access` logger has
    handlers, which KServe's logging configuration gives it (again in each worker process): they are
    removed after each configuration.
    """
    from kserve import logging as kserve_logging
    from kserve.protocol.rest import server as rest

    original = getattr(rest.RESTServer.__init__, "__wrapped__", rest.RESTServer.__init__)

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.config.proxy_headers = False
        if limits is not None:
            self.config.http = functools.partial(_limited_http_protocol(), limits=limits)

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


_408 = b'{"error": {"code": "request_timeout", "message": "The request head did not arrive in time."}}'
_414 = b'{"error": {"code": "uri_too_long", "message": "The request target is too long."}}'
_431 = b'{"error": {"code": "headers_too_large", "message": "The request line and headers are too large."}}'
_503 = b'{"error": {"code": "too_many_connections", "message": "Too many open connections; retry shortly."}}'
REFUSED_LINGER_S = 1.0  # a refused connection reads (and drops) what its client sent for this long, then closes


def _raw_response(status: bytes, body: bytes, *extra: bytes) -> bytes:
    return b"".join([b"HTTP/1.1 ", status, b"\r\ncontent-type: application/json\r\ncontent-length: ",
                     str(len(body)).encode(), b"\r\nconnection: close\r\n", *extra, b"\r\n", body])


# Called by every HTTP connection with a request's ASGI scope once its head is parsed (use_front_door).
_front_door: Callable[[dict], tuple[int, list, bytes] | None] | None = None


def use_front_door(door: Callable[[dict], tuple[int, list, bytes] | None] | None) -> None:
    """Have this process's HTTP connections call `door(scope)` once a request's head is parsed, before any
    ASGI task is made: (status, headers, body) is written as the whole answer there and then; None lets
    the request go on to the app."""
    global _front_door
    _front_door = door


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head over the size limit."""


def _limited_http_protocol() -> type:
    """LimitedHttpProtocol: uvicorn's httptools protocol (the one it picks, and KServe's
    uvicorn[standard] installs) with the connection limits uvicorn 0.55 lacks:

    - idle: uvicorn arms its keep-alive timeout (KServe's --timeout-keep-alive) only after a response,
      so a connection that never sends a byte was held forever; it is armed on connect too;
    - head deadline: from the first byte of a request (or of anything while no request is being
      served) to the end of its headers, `header_timeout_s`; then 408 and close (any data restarted
      uvicorn's keep-alive timer, so a client trickling its head was held forever);
    - head size: request line and headers above `max_header_bytes` get 431 (414 when the request
      target alone passes it) and close (httptools buffers a head of any size; h11's limit does not
      apply to it);
    - open connections: at `max_connections`, a new connection closes the one idle longest (no
      request in progress: closing it is what HTTP keep-alive allows at any time); with none idle,
      the new connection gets 503 + Retry-After and is closed. uvicorn's limit_concurrency is not
      used: it answers 503 to requests, /health and the probes included, and closes no idle
      connection, so it bounds neither descriptors nor memory.
    """
    if "LimitedHttpProtocol" in globals():
        return globals()["LimitedHttpProtocol"]
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class LimitedHttpProtocol(HttpToolsProtocol):
        def __init__(self, *args, limits: ConnectionLimits, **kwargs):
            super().__init__(*args, **kwargs)
            self.limits = limits
            self.refused = False
            self.in_head = False  # a request's head has begun and not ended
            self.heads_begun = 0
            # Two undercounts of the head in progress, each held to the limit: what the parser has handed
            # over (request target, whole header lines), and the reads after its first that did not end it.
            self.head_parsed = self.head_read = 0
            self.head_too_large: tuple[bytes, bytes] | None = None  # the answer to a head over the limit
            self.head_timer = None
            self.last_active = time.monotonic()

        # -- connections: the bound, and the idle timeout from the start
        def connection_made(self, transport) -> None:
            if len(self.connections) >= self.limits.max_connections and not self._close_longest_idle():
                self.transport = transport
                self._refuse(b"503 Service Unavailable", _503, b"retry-after: 1\r\n")
                return
            super().connection_made(transport)
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

        def idle(self) -> bool:
            return self.refused or (not self.in_head and not self.pipeline and not self.transport.is_closing()
                                    and (self.cycle is None or self.cycle.response_complete))

        def _close_longest_idle(self) -> bool:
            idle = [c for c in self.connections if isinstance(c, LimitedHttpProtocol) and c.idle()]
            if not idle:
                return False
            oldest = min(idle, key=lambda c: c.last_active)
            self.connections.discard(oldest)
            oldest.transport.close()
            return True

        def connection_lost(self, exc) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        # -- the head: deadline and size
        def data_received(self, data: bytes) -> None:
            if self.refused:
                return
            self.last_active = time.monotonic()
            continuing, begun = self.in_head, self.heads_begun
            super().data_received(data)
            if self.refused or self.transport.is_closing():
                return
            if self.in_head and continuing and begun == self.heads_begun:  # every byte read was this head's
                self.head_read += len(data)
                if self.head_read > self.limits.max_header_bytes:
                    self._refuse(b"431 Request Header Fields Too Large", _431)
                    return
            if self.head_timer is None and (self.in_head or (self.idle() and self.timeout_keep_alive_task is None)):
                # A head in progress, or bytes that began none (uvicorn stopped the idle timer for them and
                # no answer completed since, which would have started it again: a refused call's did).
                self.head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.in_head, self.head_parsed, self.head_read = True, 0, 0
            self.heads_begun += 1

        def _count(self, size: int, answer: tuple[bytes, bytes]) -> None:
            self.head_parsed += size
            if self.head_parsed > self.limits.max_header_bytes:
                self.head_too_large = answer
                raise _HeadTooLarge  # httptools stops parsing; uvicorn answers through send_400_response

        def on_url(self, url: bytes) -> None:
            self._count(len(url), (b"414 URI Too Long", _414))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4, (b"431 Request Header Fields Too Large", _431))
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self.in_head = False
            self._stop_head_timer()
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:
            if self.head_too_large:
                self._refuse(*self.head_too_large)
            else:
                super().send_400_response(msg)

        def on_response_complete(self) -> None:
            self.last_active = time.monotonic()
            super().on_response_complete()

        # -- the front door: a request refused as soon as its head is parsed, with no ASGI task
        def _start_asgi_task(self, cycle, app) -> None:
            door = _front_door
            answer = None
            if door is not None:
                try:
                    answer = door(cycle.scope)
                except Exception:  # the app's own guard decides then, and reports what is wrong
                    logging.getLogger("predictor").exception("the front door failed; the request goes on to the app")
            if answer is None:
                super()._start_asgi_task(cycle, app)
            else:
                self._answer_at_door(cycle, *answer)

        def _answer_at_door(self, cycle, status: int, headers: list, body: bytes) -> None:
            """Write a whole response as uvicorn's cycle would (its default headers, keep-alive unless
            the answer or the request says close) and complete the cycle; the request's body, if it
            comes, is read and dropped by the parser as for any answered request."""
            from uvicorn.protocols.http.httptools_impl import STATUS_LINE

            close = not cycle.keep_alive or cycle.waiting_for_100_continue or (b"connection", b"close") in headers
            content = [STATUS_LINE[status]]
            for name, value in [*cycle.default_headers, *headers]:
                content.extend([name, b": ", value, b"\r\n"])
            if close and (b"connection", b"close") not in headers:
                content.append(b"connection: close\r\n")
            content.extend([b"\r\n", body])
            self.transport.write(b"".join(content))
            cycle.response_started = cycle.response_complete = True
            cycle.keep_alive, cycle.waiting_for_100_continue = not close, False
            cycle.message_event.set()
            if close:
                self.transport.close()
            self.on_response_complete()

        def _stop_head_timer(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _head_timed_out(self) -> None:
            self.head_timer = None
            if self.refused or self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.keep_alive = False  # a pipelined head behind a response: close once it is sent
                return
            if self.in_head:
                self._refuse(b"408 Request Timeout", _408)
            else:
                self.transport.close()

        def _refuse(self, status: bytes, body: bytes, *headers: bytes) -> None:
            """Answer `status` (unless inside another response) and close: the answer, then FIN, then what the
            client still sends is read and dropped for REFUSED_LINGER_S, so that closing never resets the
            connection under an answer it has not read."""
            self.refused = True
            self._stop_head_timer()
            self._unset_keepalive_if_required()
            transport = self.transport
            if self.cycle is not None and not self.cycle.response_complete:
                transport.close()
                return
            transport.write(_raw_response(status, body, *headers))
            if transport.can_write_eof():
                transport.write_eof()
                self.loop.call_later(REFUSED_LINGER_S, transport.close)
            else:
                transport.close()

    LimitedHttpProtocol.__module__, LimitedHttpProtocol.__qualname__ = __name__, "LimitedHttpProtocol"
    globals()["LimitedHttpProtocol"] = LimitedHttpProtocol
    return LimitedHttpProtocol


def use_grpc_server(server_class: type) -> None:
    """Make KServe's ModelServer start `server_class` (a subclass of its GRPCServer) for `--enable_grpc true`."""
    from kserve import model_server

    model_server.GRPCServer = server_class


def use_patient_workers(on_worker_start: Callable) -> None:
    """Make KServe's multi-process server fork (instead of spawn) and watch its workers as
    PatientWorkerProcess, each of which calls `on_worker_start(model)` for its model before serving."""
    from kserve.protocol.rest.multiprocess import server as multiprocess

    worker_class = _patient_worker_process()
    worker_class.on_worker_start = staticmethod(on_worker_start)
    multiprocess.RESTServerProcess = worker_class
    # Forked, not spawned: this process has imported everything and serves the engine by then, so each
    # worker shares its pages copy-on-write (~130 MB of imports each, measured as PSS) and starts in
    # milliseconds instead of importing KServe again. The hook makes what must be per process anew.
    multiprocess.spawn = multiprocessing.get_context("fork")


def _patient_worker_process() -> type:
    from kserve.protocol.rest.multiprocess import server as multiprocess

    base = multiprocess.RESTServerProcess
    if getattr(base, "patient", False):
        return base

    class PatientWorkerProcess(base):
        """A KServe worker process that runs `on_worker_start` on its model first (KServe has it import
        `kserve.model_server.app` by name) and whose liveness ping may take WORKER_ANSWER_TIMEOUT_S: a
        worker answers only once it has installed the app and connected, which on a throttled 2-core
        node can take longer than KServe's 5 s; KServe would kill it and start another, forever."""

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
    if name == "LimitedHttpProtocol":
        return _limited_http_protocol()
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
    from uvicorn.protocols.http import httptools_impl

    http = httptools_impl.HttpToolsProtocol
    hooks = ("connection_made", "connection_lost", "data_received", "on_message_begin", "on_url", "on_header",
             "on_headers_complete", "on_response_complete", "send_400_response", "timeout_keep_alive_handler")
    expect(all(callable(getattr(http, name, None)) for name in hooks)
           and all(f"self.{name}" in _source(http.__init__) for name in ("pipeline", "connections", "cycle", "timeout_keep_alive_task"))
           and "send_400_response" in _source(http.data_received),
           "uvicorn's HttpToolsProtocol no longer has the hooks and state LimitedHttpProtocol extends (configure_uvicorn)")
    expect("logging.configure_logging(" in _source(multiprocess),
           "KServe's worker no longer configures logging through kserve.logging.configure_logging (configure_uvicorn)")
    expect("TimingMiddleware" in _source(rest.RESTServer._add_middlewares),
           "RESTServer._add_middlewares no longer adds timing_asgi's TimingMiddleware (without_timing_log)")
    process = getattr(multiprocess, "RESTServerProcess", None)
    expect(process is not None and "timeout" in inspect.signature(process.is_alive).parameters,
           "RESTServerProcess.is_alive(timeout) is gone (use_patient_workers)")
    expect(process is not None and callable(getattr(process, "target", None)) and "_real_target" in _source(multiprocess),
           "RESTServerProcess no longer runs its server through target/_real_target (use_patient_workers)")
    kserves_own = next((c for c in getattr(process, "__mro__", ()) if c.__module__ == multiprocess.__name__), None)
    expect(hasattr(multiprocess, "spawn") and "spawn.Process(" in _source(getattr(kserves_own, "__init__", None)),
           "RESTServerProcess no longer starts its process through the module's `spawn` context (use_patient_workers forks)")
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
