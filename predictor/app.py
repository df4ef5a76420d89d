"""The composition root: builds, from one model and its `Settings`, everything that serves it on KServe's
FastAPI app (routes, guard and admission, error format, result cache, jobs, drain on SIGTERM, gRPC gates).

KServe serves `kserve.model_server.app` (its worker processes import it by name), so this does not
build a new app: `install` adds, to the app it is given, our routes (ahead of KServe's, which it
registers when the server starts), the error format, the guard in front of every route, and the
drain on SIGTERM. `python -m predictor` calls it in the serving process and in each worker process
(through predictor.serving.kserve_compat's worker hook); nothing is registered at import time.

What replicas share, the job store and the result cache, are on Redis (`--redis_url`) or, without it,
in this process only (jobs then die with it and are invisible to other replicas: warned at start-up).
"""

import logging
import os
import signal
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from predictor.config import Settings
from predictor.core.cache import ResultCache
from predictor.core.security import RateLimiter
from predictor.engines.engine_server import EngineServer
from predictor.engines.link import Layout
from predictor.engines.remote import RemoteEngine
from predictor.jobs.api import QueuedBytes, build_jobs_router
from predictor.jobs.core import JobStore, JobWorker
from predictor.jobs.memory_store import MemoryJobStore
from predictor.jobs.redis_store import PROBE_TIMEOUT_S, RedisJobStore
from predictor.model import Cifar10Classifier
from predictor.protocols import omit_unset_optional_fields
from predictor.redis_client import connect
from predictor.serving import kserve_compat, openapi
from predictor.serving.admission import Gates
from predictor.serving.demo import build_ui_router
from predictor.serving.docs import install_docs
from predictor.serving.explain import build_explain_router
from predictor.serving.guard import FrontDoor, RequestGuard
from predictor.serving.http_errors import install_error_handlers
from predictor.serving.routes import build_router, plain_routes

log = logging.getLogger("predictor")

# A cache look-up must never hold a classify call up for long when Redis is slow or gone.
CACHE_TIMEOUT_S = 0.25
# A job API call (a whole job's files written at once included) that takes longer finds Redis
# unwell: it gets 503 and the store stops calling Redis for a while (RedisJobStore's breaker).
STORE_TIMEOUT_S = 3.0
# The workers' stream reads block for up to 2 s.
STORE_BLOCKING_TIMEOUT_S = 10.0


def install(app: FastAPI, model: Cifar10Classifier) -> None:
    """Serve `model` (loaded) on `app`: routes, error format, guard (with the model's settings), cache, jobs, drain."""
    settings, drain, dataplane = model.settings, model.drain, model.dataplane
    # A canary with other weights has another version, so it never reads the stable model's entries.
    namespace = f"{model.version}:{dataplane.engine.precision}"
    dataplane.use_cache(build_cache(settings, namespace))
    kserve_compat.use_orjson_response(app)  # before any route: the routes take the app's response class
    router = build_router(model)
    app.include_router(router)
    app.include_router(build_explain_router(model))
    app.include_router(build_ui_router(model))
    # `/classify/image/` would otherwise be redirected (307) to an absolute URL built from the
    # request's Host header, which the client chose.
    app.router.redirect_slashes = False
    install_error_handlers(app)
    omit_unset_optional_fields()
    # The gRPC server (predictor.serving.grpc_server) admits its calls through these same gates and buckets.
    model.gates = Gates.build(settings, drain)
    app.add_middleware(RequestGuard, gates=model.gates, version=model.version, router=app.router,
                       direct_routes=plain_routes(router))
    kserve_compat.use_front_door(FrontDoor(model.gates))  # the same gates, run by the HTTP protocol first

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
        if isinstance(dataplane.engine, RemoteEngine):
            # A front end (--workers N) without its engine process cannot serve: it stops (its waiting
            # calls have had their 503), and the pod restarts with a new engine.
            await dataplane.engine.connect(on_lost=lambda: os.kill(os.getpid(), signal.SIGTERM))
        yield
        log.info("drained: %d admitted request(s) still in flight at exit", drain.in_flight)

    app.router.lifespan_context = lifespan

    async def classify_job(files: list, top_k: int | None, owner: str | None) -> list:
        results, _ = await dataplane.classify(files, top_k, owner, background=True)
        return results

    # Included after the lifespan is set, so its own (the job worker's start and stop) merges into it.
    app.include_router(build_jobs(settings, classify_job, model.gates.limiter, model.name, model.version, namespace))


def install_in_worker(model: Cifar10Classifier) -> None:
    """What each `--workers N` process runs before serving (predictor.serving.kserve_compat's hook)."""
    from kserve import model_server

    model.in_forked_process()
    install(model_server.app, model)
    kserve_compat.configure_uvicorn(model.settings.request_log)  # KServe configures logging again in there


def share_engine(model: Cifar10Classifier) -> EngineServer:
    """With --workers N: serve `model`'s engine (loaded in this process) to the N front-end processes, and
    make `model`, which each of them inherits (forked), reach it over the link instead of holding it."""
    settings, dataplane = model.settings, model.dataplane
    per_front_end = settings.max_batch_size
    server = EngineServer(dataplane.engine, model.reference, front_ends=settings.workers,
                          max_batch_images=settings.engine_max_batch_size or per_front_end * settings.workers,
                          explain_threads=settings.max_explain_in_flight)
    server.start()
    remote = RemoteEngine.describing(dataplane.engine, server.address, Layout(per_front_end), model.reference.fc_weight)
    model.use_engine(remote)
    return server


def build_cache(settings: Settings, namespace: str) -> ResultCache | None:
    """The result cache (in-process only without a Redis URL; none with --cache_ttl_s 0)."""
    if settings.cache_ttl_s <= 0:
        return None
    client = connect(settings.redis_url, CACHE_TIMEOUT_S, retries=1) if settings.redis_url else None
    return ResultCache(namespace, settings.cache_ttl_s, client, per_key=not settings.cache_shared_across_keys)


def build_jobs(settings: Settings, classify: Callable[..., Awaitable[list]], limiter: RateLimiter | None,
               model_name: str = "model", model_version: str | None = None,
               work_namespace: str = "unversioned") -> APIRouter:
    """The jobs router, with its store and its worker (started with the app). Replicas of one
    `model_name` share job state; only those of one `work_namespace` (version and precision)
    compute each other's jobs. Results are stamped with `model_version`."""
    redis_url, job_ttl_s, visibility_timeout_s = settings.redis_url, settings.job_ttl_s, settings.job_visibility_timeout_s
    store: JobStore
    if redis_url:
        store = RedisJobStore(connect(redis_url, STORE_TIMEOUT_S, retries=3), job_ttl_s, visibility_timeout_s,
                              model=model_name, version=work_namespace,
                              blocking_client=connect(redis_url, STORE_BLOCKING_TIMEOUT_S, retries=3),
                              model_version=model_version, probe_client=connect(redis_url, PROBE_TIMEOUT_S, retries=0))
    else:
        log.warning("no --redis_url: async jobs and the result cache live in this process only; jobs are lost "
                    "when it stops and other replicas cannot see them (set REDIS_URL for more than one replica)")
        store = MemoryJobStore(job_ttl_s, model_version)
    worker = JobWorker(store, classify, visibility_timeout_s, model_version=model_version)
    queued = QueuedBytes(store, settings.max_job_queued_bytes, settings.max_job_queued_bytes_per_key)
    return build_jobs_router(store, worker, limiter, settings.max_job_files, settings.max_job_bytes,
                             settings.job_chunk_size, settings.max_body_bytes, queued, settings.job_owner_header)
