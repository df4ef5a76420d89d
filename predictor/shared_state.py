"""What replicas share: the job store and the result cache, on Redis (`--redis_url`) or, without it,
in this process only (jobs then die with it and are invisible to other replicas: warned at start-up)."""

import logging
from collections.abc import Awaitable, Callable

from fastapi import APIRouter

from .cache import CachedClassifier, ResultCache
from .jobs import JobStore, JobWorker
from .jobs_api import build_jobs_router
from .jobs_memory import MemoryJobStore
from .jobs_redis import RedisJobStore
from .redis_client import connect
from .security import ApiKeys, RateLimiter

log = logging.getLogger("predictor")

# A cache look-up must never hold a classify call up for long when Redis is slow or gone.
CACHE_TIMEOUT_S = 0.25
# Job store calls include blocking stream reads of up to 2 s.
STORE_TIMEOUT_S = 10.0


def build_cache(redis_url: str | None, ttl_s: int, namespace: str, classify: Callable[..., Awaitable[list]],
                on_hit: Callable[[dict], None]) -> CachedClassifier:
    """The classification core behind the result cache (in-process only without a Redis URL; none with ttl_s 0)."""
    if ttl_s <= 0:
        return CachedClassifier(None, classify)
    client = connect(redis_url, CACHE_TIMEOUT_S, retries=1) if redis_url else None
    return CachedClassifier(ResultCache(namespace, ttl_s, client), classify, on_hit)


def build_jobs(redis_url: str | None, job_ttl_s: int, visibility_timeout_s: float,
               classify: Callable[..., Awaitable[list]], api_keys: ApiKeys, limiter: RateLimiter | None,
               max_files: int, max_bytes: int, chunk_size: int) -> APIRouter:
    """The jobs router, with its store and its worker (started with the app)."""
    store: JobStore
    if redis_url:
        store = RedisJobStore(connect(redis_url, STORE_TIMEOUT_S, retries=3), job_ttl_s, visibility_timeout_s)
    else:
        log.warning("no --redis_url: async jobs and the result cache live in this process only; jobs are lost "
                    "when it stops and other replicas cannot see them (set REDIS_URL for more than one replica)")
        store = MemoryJobStore(job_ttl_s)
    worker = JobWorker(store, classify, visibility_timeout_s)
    return build_jobs_router(store, worker, api_keys, limiter, max_files, max_bytes, chunk_size)
