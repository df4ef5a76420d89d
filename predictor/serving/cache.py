"""The result cache: the same image (same bytes) classified by the same model is answered from memory.

Key: sha256 of the file's bytes + the model's version (its weights' sha256 prefix) + precision +
top_k, so a canary serving other weights never reads the stable model's entries; with API keys on,
also the caller's key id, so one key cannot learn (from `X-Cache: hit` or the timing) which images
another key sent (`--cache_shared_across_keys` shares entries between keys instead). Value: the
classification without a timestamp. An in-process LRU sits in front of Redis (shared by every
replica); Redis failing never fails a call: the cache then serves from the LRU alone, counts each
Redis failure and logs once per outage, and does not try Redis again for `retry_after_s`.
"""

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import orjson
import redis.asyncio as redis
from prometheus_client import Counter
from redis.exceptions import RedisError

log = logging.getLogger("predictor")

CACHE_REQUESTS = Counter("predictor_cache_requests_total", "Result cache look-ups per image (result: hit|miss)", ["result"])
CACHE_REDIS_FAILURES = Counter("predictor_cache_redis_failures_total",
                               "Result cache calls to Redis that failed (served from the in-process cache instead)")


class ResultCache:
    """An LRU of `local_entries` in front of an optional Redis; entries live `ttl_s` seconds."""

    def __init__(self, namespace: str, ttl_s: int, client: redis.Redis | None = None, local_entries: int = 10_000,
                 retry_after_s: float = 5.0, clock=time.monotonic):
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.redis = client
        self.local_entries = local_entries
        self.retry_after_s = retry_after_s
        self.clock = clock
        self._local: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # key -> (expires, value)
        self._redis_down_until: float | None = None  # set while Redis is considered down

    def key(self, data: bytes, top_k: int | None, tenant: str | None = None) -> str:
        scope = self.namespace if tenant is None else f"{self.namespace}:key={tenant}"
        return f"cache:{scope}:{top_k or 0}:{hashlib.sha256(data).hexdigest()}"

    async def get_many(self, keys: list[str]) -> list[dict | None]:
        """The cached result for each key, or None; counts hits and misses."""
        found: list[bytes | None] = [self._local_get(k) for k in keys]
        missing = [i for i, v in enumerate(found) if v is None]
        if missing and self._redis_usable():
            try:
                remote = await self.redis.mget([keys[i] for i in missing])
            except RedisError as exc:
                self._redis_failed(exc)
            else:
                self._redis_ok()
                for i, value in zip(missing, remote):
                    if value is not None:
                        found[i] = value
                        self._local_put(keys[i], value)
        hits = sum(v is not None for v in found)
        CACHE_REQUESTS.labels("hit").inc(hits)
        CACHE_REQUESTS.labels("miss").inc(len(found) - hits)
        return [None if v is None else orjson.loads(v) for v in found]

    async def put_many(self, items: dict[str, dict]) -> None:
        if not items:
            return
        encoded = {k: orjson.dumps(v) for k, v in items.items()}
        for key, value in encoded.items():
            self._local_put(key, value)
        if not self._redis_usable():
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, value in encoded.items():
                    pipe.set(key, value, ex=self.ttl_s)
                await pipe.execute()
        except RedisError as exc:
            self._redis_failed(exc)
        else:
            self._redis_ok()

    def _local_get(self, key: str) -> bytes | None:
        entry = self._local.get(key)
        if entry is None:
            return None
        if entry[0] < self.clock():
            del self._local[key]
            return None
        self._local.move_to_end(key)
        return entry[1]

    def _local_put(self, key: str, value: bytes) -> None:
        self._local[key] = (self.clock() + self.ttl_s, value)
        self._local.move_to_end(key)
        if len(self._local) > self.local_entries:
            self._local.popitem(last=False)

    def _redis_usable(self) -> bool:
        if self.redis is None:
            return False
        return self._redis_down_until is None or self.clock() >= self._redis_down_until

    def _redis_failed(self, exc: Exception) -> None:
        task = asyncio.current_task()
        if task is not None and task.cancelling():  # the call was cancelled (client gone), Redis is fine
            raise asyncio.CancelledError()
        CACHE_REDIS_FAILURES.inc()
        if self._redis_down_until is None:  # once per outage
            log.warning("result cache: Redis unavailable (%s); serving from the in-process cache only, "
                        "retrying every %g s", exc, self.retry_after_s)
        self._redis_down_until = self.clock() + self.retry_after_s

    def _redis_ok(self) -> None:
        if self._redis_down_until is not None:
            log.info("result cache: Redis reachable again")
            self._redis_down_until = None


# The classification core: files (or the error reading one) and top_k -> one result or ApiError per file.
Classify = Callable[..., Awaitable[list]]


class CachedClassifier:
    """The classification core behind the cache: only the files not cached are classified; their
    results (never errors) are cached. Returns the results and whether every one was a cache hit.
    Without a cache (`--cache_ttl_s 0`) every call is a miss. `on_hit` sees each result served from the
    cache (answers served count in the prediction metrics whether computed or not). `tenant` (the
    caller's API key id; None without keys) scopes the entries a call reads and writes, unless
    `per_key` is off."""

    def __init__(self, cache: ResultCache | None, classify: Classify, on_hit: Callable[[dict], None] | None = None,
                 per_key: bool = True):
        self.cache = cache
        self.classify = classify
        self.on_hit = on_hit
        self.per_key = per_key

    async def __call__(self, files: list, top_k: int | None, tenant: str | None = None, **options) -> tuple[list, bool]:
        if self.cache is None:
            return await self.classify(files, top_k, **options), False
        tenant = tenant if self.per_key else None
        keys = [self.cache.key(f, top_k, tenant) if isinstance(f, bytes) and f else None for f in files]
        cached = await self.cache.get_many([k for k in keys if k is not None])
        found = iter(cached)
        results = [next(found) if k is not None else None for k in keys]
        missing = [i for i, r in enumerate(results) if r is None]
        if self.on_hit is not None:
            for result in results:
                if result is not None:
                    self.on_hit(result)
        if missing:
            computed = await self.classify([files[i] for i in missing], top_k, **options)
            fresh = {}
            for i, result in zip(missing, computed):
                results[i] = result
                if isinstance(result, dict):
                    fresh[keys[i]] = result
            await self.cache.put_many(fresh)
        return results, not missing
