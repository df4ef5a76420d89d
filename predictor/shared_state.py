"""What replicas share: the job store and the result cache, on Redis (`--redis_url`) or, without it,
in this process only (jobs then die with it and are invisible to other replicas: warned at start-up)."""

import logging
from collections.abc import Awaitable, Callable

from fastapi import APIRouter

from predictor.config import Settings
from predictor.jobs.api import QueuedBytes, build_jobs_router
from predictor.jobs.core import JobStore, JobWorker
from predictor.jobs.memory_store import MemoryJobStore
from predictor.jobs.redis_store import RedisJobStore
from predictor.redis_client import connect
from predictor.serving.cache import CachedClassifier, ResultCache
from predictor.serving.security import RateLimiter

log = logging.getLogger("predictor")

# A cache look-up must never hold a classify call up for long when Redis is slow or gone.
CACHE_TIMEOUT_S = 0.25
# A job API call (a whole job's files written at once included) that takes longer finds Redis
# unwell: it gets 503 and the store stops calling Redis for a while (RedisJobStore's breaker).
STORE_TIMEOUT_S = 3.0
# The workers' stream reads block for up to 2 s.
STORE_BLOCKING_TIMEOUT_S = 10.0


def build_cache(redis_url: str | None, ttl_s: int, namespace: str, classify: Callable[..., Awaitable[list]],
                on_hit: Callable[[dict], None], per_key: bool = True) -> CachedClassifier:
    """The classification core behind the result cache (in-process only without a Redis URL; none with ttl_s 0)."""
    if ttl_s <= 0:
        return CachedClassifier(None, classify)
    client = connect(redis_url, CACHE_TIMEOUT_S, retries=1) if redis_url else None
    return CachedClassifier(ResultCache(namespace, ttl_s, client), classify, on_hit, per_key=per_key)


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
                              model_version=model_version)
    else:
        log.warning("no --redis_url: async jobs and the result cache live in this process only; jobs are lost "
                    "when it stops and other replicas cannot see them (set REDIS_URL for more than one replica)")
        store = MemoryJobStore(job_ttl_s, model_version)
    worker = JobWorker(store, classify, visibility_timeout_s, model_version=model_version)
    queued = QueuedBytes(store, settings.max_job_queued_bytes, settings.max_job_queued_bytes_per_key)
    return build_jobs_router(store, worker, limiter, settings.max_job_files, settings.max_job_bytes,
                             settings.job_chunk_size, settings.max_body_bytes, queued, settings.job_owner_header)
