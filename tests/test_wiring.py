"""Explicit wiring: an app is built from a model and its settings, in-process, with nothing global.

(The served process, KServe's routes and worker processes included, is tested through real servers
everywhere else; `tests/test_workers.py` covers `--workers 2`.)
"""

import asyncio

import httpx
import pytest
from fastapi import FastAPI

from predictor.app import install
from predictor.config import Settings, default_model_dir
from predictor.core.security import ApiKeys
from predictor.model import Cifar10Classifier


@pytest.fixture(scope="module")
def two_apps():
    """Two classifiers with different settings, each installed on its own app, in one process."""
    apps = {}
    for name, keys in (("open", []), ("locked", ["s3cret"])):
        model = Cifar10Classifier(name, Settings(model_dir=default_model_dir(), api_keys=ApiKeys(keys),
                                                rate_limit_per_minute=0))
        model.load()
        app = FastAPI()
        install(app, model)
        apps[name] = app
    return apps


def call(app: FastAPI, method: str, path: str, **kwargs) -> httpx.Response:
    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(run())


def test_each_app_serves_its_own_model_with_its_own_settings(two_apps, cifar_jpegs):
    name, data = next(iter(cifar_jpegs.items()))
    upload = {"file": (name, data, "image/jpeg")}
    opened = call(two_apps["open"], "POST", "/classify/image", files=upload)
    assert opened.status_code == 200, opened.text
    assert set(opened.json()) >= {"predicted_class", "confidence", "all_probabilities", "timestamp"}
    assert call(two_apps["open"], "GET", "/health").json()["name"] == "open"
    # The other app's guard holds its own settings: keys are required there, and only there.
    refused = call(two_apps["locked"], "POST", "/classify/image", files=upload)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    allowed = call(two_apps["locked"], "POST", "/classify/image", files=upload, headers={"X-API-Key": "s3cret"})
    assert allowed.status_code == 200 and allowed.json()["predicted_class"] == opened.json()["predicted_class"]
    assert call(two_apps["locked"], "GET", "/health").json()["name"] == "locked"


def test_the_error_format_is_installed_with_the_routes(two_apps):
    bad = call(two_apps["open"], "POST", "/classify/image", files={"file": ("x.jpg", b"not an image", "image/jpeg")})
    assert bad.status_code == 415 and bad.json()["error"]["code"] == "unsupported_media_type"
    missing = call(two_apps["open"], "POST", "/classify/image")
    assert missing.status_code == 422 and missing.json()["error"]["code"] == "invalid_request"


def test_serving_imports_no_build_time_code():
    """The server loads the shipped weights and serves without training, data-loading or quantization
    code (those are `make` targets on a workstation, not part of a request's path), and with the
    default engine on a CPU, without torch (the CPU image has none)."""
    import subprocess
    import sys

    script = ("import sys; from fastapi import FastAPI; from predictor.__main__ import main; from predictor.app import install; "
              "from predictor.config import Settings, default_model_dir; from predictor.model import Cifar10Classifier; "
              "model = Cifar10Classifier('m', Settings(model_dir=default_model_dir())); model.load(); install(FastAPI(), model); "
              "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('predictor', 'torch'))))")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True).stdout.split()
    assert "predictor.model" in loaded and "predictor.engines.onnx_int8" in loaded, loaded
    assert not [m for m in loaded if m.startswith("predictor.training")], loaded
    assert "torch" not in loaded and "predictor.engines.torch_engine" not in loaded, loaded


def test_a_failed_forward_pass_is_a_500_inference_error_that_names_no_internals(cifar_jpegs):
    """The engine failing under a request (injected after a real load: the engine is the dependency, the
    error path is what is tested): 500 inference_error with the fixed message; the engine's own text stays
    in the log; the next pass serves again."""
    from predictor.core.batcher import FORWARD_FAILED

    model = Cifar10Classifier("faulty", Settings(model_dir=default_model_dir(), rate_limit_per_minute=0))
    model.load()
    app = FastAPI()
    install(app, model)
    working = model.dataplane.batcher.forward

    def failing(images):
        raise RuntimeError("CUDA error: an illegal memory access at /opt/venv/secret.py:42")

    name, data = next(iter(cifar_jpegs.items()))
    model.dataplane.batcher.forward = failing
    failed = call(app, "POST", "/classify/image", files={"file": (name, data, "image/jpeg")})
    assert failed.status_code == 500 and failed.json() == {"error": {"code": "inference_error", "message": FORWARD_FAILED}}
    # gRPC maps the same failure to the same error (then to INTERNAL with its message).
    from kserve.errors import InferenceError

    from predictor.serving.http_errors import as_api_error, http_status

    error = as_api_error(InferenceError(FORWARD_FAILED), "test")
    assert (http_status(error), error.code, error.message) == (500, "inference_error", FORWARD_FAILED)
    model.dataplane.batcher.forward = working
    assert call(app, "POST", "/classify/image", files={"file": (name, data, "image/jpeg")}).status_code == 200


def test_a_middleware_inside_the_guard_still_sees_the_hot_routes(cifar_jpegs):
    """The guard calls the hot endpoints itself only when nothing but the framework lies between it and
    them: a user middleware there (KServe adds its access logger inside the guard when asked to) still
    sees every call."""
    seen = []

    class Recorder:
        def __init__(self, asgi_app):
            self.app = asgi_app

        async def __call__(self, scope, receive, send):
            seen.append(scope["path"])
            await self.app(scope, receive, send)

    model = Cifar10Classifier("recorded", Settings(model_dir=default_model_dir(), rate_limit_per_minute=0))
    model.load()
    app = FastAPI()
    app.add_middleware(Recorder)  # before install: inside the guard, which install adds outermost
    install(app, model)
    answer = call(app, "POST", "/classify/image", files={"file": cifar_jpegs["cat_0000.jpg"]})
    assert answer.status_code == 200 and answer.json()["predicted_class"] == "cat"
    assert "/classify/image" in seen
