"""The result cache: the same image (same bytes) classified by the same model is answered from memory.

Key: sha256 of the file's bytes + the model's version (its weights' sha256 prefix) + precision +
top_k, so a canary serving other weights never reads the stable model's entries; with API keys on,
also the caller's key id, so one key cannot learn (from `X-Cache: hit` or the timing) which images
another key sent (`--cache_shared_across_keys` shares entries between keys instead). Value: the
classification without a timestamp. An in-process LRU sits in front of Redis (shared by every
replica); Redis failing never fails a call: the cache then serves from the LRU alone, counts each
Redis failure and logs once per outage, and does not try Redis again for `retry_after_s`
(predictor.core.breaker). The data plane (predictor.dataplane) reads and fills it.
"""

import hashlib
import logging
import time
from collections import OrderedDict

import orjson
import redis.asyncio as redis
from prometheus_client import Counter
from redis.exceptions import RedisError

from predictor.core.breaker import Breaker

log = logging.getLogger("predictor")

CACHE_REQUESTS = Counter("predictor_cache_requests_total", "Result cache look-ups per image (result: hit|miss)", ["result"])
CACHE_REDIS_FAILURES = Counter("predictor_cache_redis_failures_total",
                               "Result cache calls to Redis that failed (served from the in-process cache instead)")


class ResultCache:
    """An LRU of `local_entries` in front of an optional Redis; entries live `ttl_s` seconds. With
    `per_key`, a tenant (the caller's API key id) reads and writes only its own entries."""

    def __init__(self, namespace: str, ttl_s: int, client: redis.Redis | None = None, local_entries: int = 10_000,
                 retry_after_s: float = 5.0, clock=time.monotonic, per_key: bool = True):
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.redis = client
        self.local_entries = local_entries
        self.per_key = per_key
        self.clock = clock
        self._local: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # key -> (expires, value)
        self._breaker = Breaker("result cache", retry_after_s, clock)

    def key(self, data: bytes, top_k: int | None, tenant: str | None = None) -> str:
        scope = self.namespace if tenant is None or not self.per_key else f"{self.namespace}:key={tenant}"
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
        return self.redis is not None and self._breaker.usable()

    def _redis_failed(self, exc: Exception) -> None:
        CACHE_REDIS_FAILURES.inc()
        self._breaker.failed(exc, "serving from the in-process cache only")

    def _redis_ok(self) -> None:
        self._breaker.succeeded()
