"""Wiring: puts one classifier's HTTP side on KServe's FastAPI app.

KServe serves `kserve.model_server.app` (its worker processes import it by name), so this does not
build a new app: `install` adds, to the app it is given, our routes (ahead of KServe's, which it
registers when the server starts), the error format, the guard in front of every route, and the
drain on SIGTERM. `python -m predictor` calls it in the serving process and `predictor.serving.kserve_compat` in
each worker process; nothing is registered at import time.
"""

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from predictor.model import Cifar10Classifier
from predictor.serving import kserve_compat, metrics, openapi
from predictor.serving.demo import build_ui_router
from predictor.serving.docs import install_docs
from predictor.serving.error_handlers import install_error_handlers
from predictor.serving.explain import build_explain_router
from predictor.serving.guard import Gates, RequestGuard
from predictor.serving.protocols import omit_unset_optional_fields
from predictor.serving.routes import build_router
from predictor.shared_state import build_cache, build_jobs

log = logging.getLogger("predictor")


def install(app: FastAPI, model: Cifar10Classifier) -> None:
    """Serve `model` on `app`: routes, error format, guard (with the model's settings) and drain."""
    settings, drain = model.settings, model.drain
    # A canary with other weights has another version, so it never reads the stable model's entries.
    cached = build_cache(settings.redis_url, settings.cache_ttl_s, f"{model.version}:{model.runner.precision}",
                         model.classify, lambda r: metrics.record_prediction(r["predicted_class"], r["confidence"], model.version),
                         per_key=not settings.cache_shared_across_keys)
    kserve_compat.use_orjson_response(app)  # before any route: the routes take the app's response class
    app.include_router(build_router(model, cached))
    app.include_router(build_explain_router(model))
    app.include_router(build_ui_router(model))
    # `/classify/image/` would otherwise be redirected (307) to an absolute URL built from the
    # request's Host header, which the client chose.
    app.router.redirect_slashes = False
    install_error_handlers(app)
    omit_unset_optional_fields()
    # The gRPC server (predictor.serving.grpc_server) admits its calls through these same gates and buckets.
    model.gates = Gates.build(settings, drain)
    limiter = model.gates.limiter
    app.add_middleware(RequestGuard, gates=model.gates, version=model.version, router=app.router)

    openapi.describe(app)  # what the server answers: errors per route, media types, no refused routes
    install_docs(app)  # /docs: Swagger UI from this server's own files, not a CDN

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        # KServe registers its own handlers (plain-string errors) and middleware just before the server
        # starts; put ours back on top, take its timing log off, and have Starlette rebuild the stack.
        install_error_handlers(app)
        kserve_compat.without_timing_log(app)
        app.middleware_stack = None
        # The server's own SIGTERM handler is in place by now; it runs once the admitted calls are done.
        drain.chain_signal_handler(timeout_s=settings.drain_timeout_s)
        yield
        log.info("drained: %d admitted request(s) still in flight at exit", drain.in_flight)

    app.router.lifespan_context = lifespan

    async def classify_job(files: list, top_k: int | None, owner: str | None) -> list:
        results, _ = await cached(files, top_k, owner, background=True)
        return results

    # Included after the lifespan is set, so its own (the job worker's start and stop) merges into it.
    app.include_router(build_jobs(settings, classify_job, limiter, model.name, model.version,
                                  f"{model.version}:{model.runner.precision}"))
