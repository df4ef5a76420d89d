"""predictor.serving.kserve_compat against the installed kserve: every assumption its patches make holds, and one
that stops holding (as an upgrade would break it) is reported and stops the server with one line.
What the patches do is tested through real servers (proxy headers: test_hardening; gRPC gates:
test_grpc; --workers: test_workers; the logs per request: here)."""

import multiprocessing
import subprocess
import sys
from importlib import metadata

import pytest
from kserve import model_server
from kserve.protocol.grpc import server as grpc_server
from kserve.protocol.rest import server as rest
from kserve.protocol.rest.multiprocess import server as multiprocess

from predictor.serving import kserve_compat

from .conftest import ROOT, Server


def test_every_assumption_holds_on_the_installed_kserve():
    assert kserve_compat.problems() == []
    kserve_compat.check_installed()
    # Written for the version pyproject.toml pins, which is the one installed here.
    assert metadata.version("kserve") == kserve_compat.WRITTEN_FOR


def add_other_middleware(self, app):  # a RESTServer._add_middlewares without the timing log
    pass


def worker_init_with_its_own_context(self, sockets, target, log_config_file=None):  # a RESTServerProcess that
    self._process = multiprocessing.get_context("forkserver").Process(target=target)  # ignores the module's context


def init_without_a_config(self, app):  # a RESTServer.__init__ that no longer builds uvicorn's Config
    self.app = app


@pytest.mark.parametrize("break_it, reported", [
    (lambda mp: mp.setattr(multiprocess.RESTServerProcess, "is_alive", lambda self: True), "is_alive(timeout)"),
    (lambda mp: mp.setattr(rest.RESTServer, "__init__", init_without_a_config), "self.config"),
    (lambda mp: mp.delattr(model_server, "GRPCServer"), "model_server.GRPCServer"),
    (lambda mp: mp.setattr(grpc_server.GRPCServer, "start", lambda self, max_workers, port: None), "start(max_workers)"),
    (lambda mp: mp.delattr(model_server, "app"), "model_server.app"),
    (lambda mp: mp.setattr(rest.RESTServer, "_add_middlewares", add_other_middleware), "TimingMiddleware"),
    (lambda mp: mp.setattr(multiprocess.RESTServerProcess, "__init__", worker_init_with_its_own_context), "`spawn` context"),
], ids=["worker-ping", "rest-config", "grpc-server", "grpc-start", "app", "timing-middleware", "worker-context"])
def test_a_broken_assumption_is_named_and_stops_the_server(monkeypatch, break_it, reported):
    break_it(monkeypatch)
    found = kserve_compat.problems()
    assert len(found) == 1 and reported in found[0], found
    with pytest.raises(kserve_compat.IncompatibleKServe, match=rf"kserve {metadata.version('kserve')} is installed; "
                                                             rf"predictor.serving.kserve_compat was written for 0\.21\.0"):
        kserve_compat.check_installed()


def test_the_server_checks_at_start_up_and_stops_with_one_line():
    """The same check runs in `python -m predictor` before anything is served: here kserve is made to
    look changed (its worker ping loses its timeout) in the process itself, before main() runs."""
    code = ("import sys; from predictor import __main__ as m; "
            "from kserve.protocol.rest.multiprocess import server as mp; "
            "mp.RESTServerProcess.is_alive = lambda self: True; "
            "sys.argv = ['predictor', '--enable_grpc', 'false', '--http_port', '0']; m.main()")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if " ERROR " in line or "Traceback" in line]
    assert result.returncode == 2, output
    assert len(errors) == 1 and "written for 0.21.0" in errors[0] and "is_alive(timeout)" in errors[0], output


def test_the_worker_class_is_found_by_name_in_a_fresh_process():
    """KServe spawns worker processes, which unpickle the worker class by its module and name."""
    code = ("import pickle, sys; from predictor.serving import kserve_compat as k; k.before_kserve_import(); "
            "cls = k.PatientWorkerProcess; assert pickle.loads(pickle.dumps(cls)) is cls; "
            "assert cls.is_alive.__defaults__ == (k.WORKER_ANSWER_TIMEOUT_S,)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


@pytest.mark.slow
def test_a_call_writes_no_log_line_unless_the_access_log_is_asked_for(server, cifar_jpegs):
    """By default a call logs nothing (KServe's two kserve.trace timing lines, its latency line and
    uvicorn's access line are all off); `--request_log true` brings uvicorn's line back."""
    upload = {"file": ("cat.jpg", next(iter(cifar_jpegs.values())), "image/jpeg")}
    before = server.log()
    assert server.client.post("/classify/image", files=upload).status_code == 200
    assert server.client.get("/health").status_code == 200
    written = server.log()[len(before):]
    assert "kserve.trace" not in written and "POST /classify/image" not in written, written
    logging = Server("--request_log", "true", "--rate_limit_per_minute", "0")
    try:
        assert logging.client.post("/classify/image", files=upload).status_code == 200
        logging.client.get("/health")
        assert '"POST /classify/image HTTP/1.1" 200' in logging.log()
    finally:
        logging.stop()
