"""The job store on Redis, shared by every replica: state and results in hashes, work on a Stream.

Keys (all expire `ttl_s` after the job's last change), {model} the model's name, {version} its
version (weights digest and precision):
  job:{model}:{id}            hash: owner, status, total, chunks, top_k, model_version, created_at, finished_at, error
  job:{model}:{id}:in:{n}     list: the files of chunk n (deleted once the chunk is done)
  job:{model}:{id}:out        hash: input index -> result JSON (written by index, so a redone chunk rewrites its slots)
  job:{model}:{id}:done       set: chunk numbers done; the job succeeds when it holds them all
  jobs:{model}:{version}:work     Stream of chunks, consumer group `workers:{model}:{version}`
  jobs:{model}:{version}:queued   sorted set: id -> created (epoch s) of jobs not started yet (oldest-queued metric)

The work is namespaced by model and version: during a canary (or with two models on one Redis) a
job is computed only by replicas serving the weights it was submitted to. Its state is namespaced
by model only, so a client polling through a traffic split reads it on a replica of either version.

A replica that dies mid-chunk leaves the entry pending in the group; after `visibility_timeout_s`
without a heartbeat another replica takes it over with XAUTOCLAIM. Every state change that must be
atomic (finish a chunk, cancel, start) is one Lua script.
"""

import asyncio
import contextlib
import logging
import time
import uuid

import orjson
import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from predictor.core.breaker import Breaker
from predictor.jobs.core import Chunk, Job, QueueStats, StoreUnavailable, now_iso

log = logging.getLogger("predictor")


# Returns 'succeeded' when this chunk finished its job, else false.
# KEYS: meta, out, done, stream, input, queued. ARGV: id, chunk no, entry id, group, now, ttl, idx, json, ...
_COMPLETE = """
redis.call('XACK', KEYS[4], ARGV[4], ARGV[3])
redis.call('XDEL', KEYS[4], ARGV[3])
redis.call('DEL', KEYS[5])
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return false end
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('SADD', KEYS[3], ARGV[2])
if redis.call('SCARD', KEYS[3]) >= tonumber(redis.call('HGET', KEYS[1], 'chunks')) then
  redis.call('HSET', KEYS[1], 'status', 'succeeded', 'finished_at', ARGV[5])
  redis.call('ZREM', KEYS[6], ARGV[1])
  status = 'succeeded'
end
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[6]) end
if status == 'succeeded' then return status end
return false
"""

# KEYS: meta, queued, out, done. ARGV: id, now, ttl, new status, error. Ends a job still queued or running:
# returns the new status, or false when it had already ended (or is gone).
_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return false end
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'finished_at', ARGV[2], 'error', ARGV[5])
redis.call('ZREM', KEYS[2], ARGV[1])
local chunks = tonumber(redis.call('HGET', KEYS[1], 'chunks'))
for n = 0, chunks - 1 do redis.call('DEL', KEYS[1] .. ':in:' .. n) end
for i = 1, 4 do if i ~= 2 then redis.call('EXPIRE', KEYS[i], ARGV[3]) end end
return ARGV[4]
"""

# KEYS: meta, queued. ARGV: id. Marks a queued job running; returns its status (false when gone).
_START = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'running')
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 'running'
end
return status
"""


# KEYS: queued. ARGV: job key prefix. Drops the ids of jobs that expired while queued (their hash is
# gone), so the oldest-queued age (and the alert on it) follows the jobs that are really waiting;
# returns the oldest remaining {id, created}.
_OLDEST_QUEUED = """
for _ = 1, 100 do
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if #oldest == 0 then return oldest end
  if redis.call('EXISTS', ARGV[1] .. oldest[1]) == 1 then return oldest end
  redis.call('ZREM', KEYS[1], oldest[1])
end
return redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
"""


# The background health check (`start`): a PING this often, given up after this long.
PROBE_INTERVAL_S = 0.25
PROBE_TIMEOUT_S = 0.25


def unavailable(exc: Exception) -> BaseException:
    """StoreUnavailable, unless the calling task is being cancelled: redis-py turns a command
    interrupted by cancellation into a connection error, and the cancellation must win."""
    task = asyncio.current_task()
    return asyncio.CancelledError() if task is not None and task.cancelling() else StoreUnavailable(str(exc))


class RedisJobStore:
    """JobStore on one Redis (`redis://[:password@]host:port/db`).

    `client` serves the API's calls (short timeout); `blocking_client` (default: `client`) the
    workers' blocking stream reads, which need a timeout longer than their block. Like the result
    cache, the store stops calling a Redis that timed out or refused a connection for
    `retry_after_s`: meanwhile every call fails at once (503 for the API) instead of each one
    waiting out its own timeout while it holds a request slot and its body. `probe_client` (a short
    timeout) watches Redis in the background once `start`ed, so an outage is found by the probe, not
    by the first caller.
    """

    def __init__(self, client: redis.Redis, ttl_s: int, visibility_timeout_s: float, model: str = "model",
                 version: str = "unversioned", blocking_client: redis.Redis | None = None,
                 retry_after_s: float = 2.0, clock=time.monotonic, model_version: str | None = None,
                 probe_client: redis.Redis | None = None):
        self.redis = client
        self.blocking = blocking_client or client
        self.model_version = model_version or version
        self._job_prefix = f"job:{model}:"
        self.stream, self.group, self.queued = (f"jobs:{model}:{version}:work", f"workers:{model}:{version}",
                                                f"jobs:{model}:{version}:queued")
        self.ttl_s = ttl_s
        self.visibility_ms = int(visibility_timeout_s * 1000)
        self._breaker = Breaker("job store", retry_after_s, clock)
        self.probe = probe_client  # None: no background health check
        self._watcher: asyncio.Task | None = None
        self._complete = client.register_script(_COMPLETE)
        self._finish = client.register_script(_FINISH)
        self._start = client.register_script(_START)
        self._oldest_queued = client.register_script(_OLDEST_QUEUED)
        self._group_ready = False

    @contextlib.asynccontextmanager
    async def _calling(self):
        """Around every Redis call: fail at once while the breaker is open; open it on a timeout or a
        connection failure; close it on success. Redis's own words go to the log, not to clients."""
        if not self._breaker.usable():
            # The health check may have found the outage first: a Redis that comes back restarted has
            # lost the consumer group too, so it is made again on the first call after.
            self._group_ready = False
            raise StoreUnavailable("Redis was unreachable moments ago")
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self._group_ready = False  # a restarted Redis has lost the group: recreate it on the next call
            self._breaker.failed(exc, "job calls fail at once")
            raise StoreUnavailable(str(exc)) from exc
        except RedisError as exc:
            if "NOGROUP" in str(exc):  # restarted between two calls, unseen: make the group again next time
                self._group_ready = False
            raise unavailable(exc) from exc
        self._breaker.succeeded()

    def _key(self, job_id: str) -> str:
        return f"{self._job_prefix}{job_id}"

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def held_bytes(self, account: str) -> tuple[int, int]:
        return 0, 0  # the inputs are in Redis, not in this process

    async def create(self, owner: str | None, files: list[bytes], top_k: int | None, chunk_size: int,
                     account: str | None = None) -> Job:
        job = Job(uuid.uuid4().hex, owner, "queued", len(files), 0, now_iso(), top_k=top_k,
                  model_version=self.model_version)
        starts = range(0, len(files), chunk_size)
        meta = self._key(job.job_id)
        async with self._calling():
            await self._ensure_group()
            # One transaction: a job is either wholly queued or not at all (the client sees 503).
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(meta, mapping={
                    "owner": owner or "", "status": "queued", "total": len(files), "chunks": len(starts),
                    "top_k": top_k or 0, "model_version": self.model_version, "created_at": job.created_at})
                pipe.expire(meta, self.ttl_s)
                for number, start in enumerate(starts):
                    key = f"{meta}:in:{number}"
                    pipe.rpush(key, *files[start:start + chunk_size])
                    pipe.expire(key, self.ttl_s)
                    pipe.xadd(self.stream, {"job": job.job_id, "n": number, "start": start, "owner": owner or "",
                                            "count": len(files[start:start + chunk_size]), "top_k": top_k or 0})
                pipe.zadd(self.queued, {job.job_id: time.time()})
                await pipe.execute()
        return job

    async def get(self, job_id: str) -> Job | None:
        async with self._calling():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(self._key(job_id))
                pipe.hlen(f"{self._key(job_id)}:out")
                meta, done = await pipe.execute()
        if not meta:
            return None
        text = {k.decode(): v.decode() for k, v in meta.items()}
        return Job(job_id, text["owner"] or None, text["status"], int(text["total"]), done, text["created_at"],
                   text.get("finished_at") or None, int(text.get("top_k", 0)) or None, text.get("error") or None,
                   text.get("model_version") or None)

    async def results(self, job_id: str, offset: int, limit: int) -> list[dict]:
        return [orjson.loads(v) for v in await self.raw_results(job_id, offset, limit)]

    async def raw_results(self, job_id: str, offset: int, limit: int) -> list[bytes]:
        fields = list(range(offset, offset + limit))
        if not fields:
            return []
        async with self._calling():
            values = await self.redis.hmget(f"{self._key(job_id)}:out", fields)
        return [v for v in values if v is not None]

    async def cancel(self, job_id: str) -> bool:
        return await self._end(job_id, "cancelled", "") is not None

    async def _end(self, job_id: str, status: str, error: str) -> str | None:
        meta = self._key(job_id)
        async with self._calling():
            ended = await self._finish(keys=[meta, self.queued, f"{meta}:out", f"{meta}:done"],
                                       args=[job_id, now_iso(), self.ttl_s, status, error])
        return ended.decode() if ended else None

    async def next_chunk(self, consumer: str, wait_s: float) -> Chunk | None:
        """A chunk whose worker went silent for the visibility timeout, else a new one (waiting up to wait_s)."""
        async with self._calling():
            await self._ensure_group()
            _, claimed, *_ = await self.redis.xautoclaim(self.stream, self.group, consumer, self.visibility_ms, "0-0",
                                                         count=1)
            if claimed:
                entry_id, fields = claimed[0]
                pending = await self.redis.xpending_range(self.stream, self.group, entry_id, entry_id, 1)
                return self._chunk(entry_id, fields, pending[0]["times_delivered"] if pending else 2)
            fresh = await self.blocking.xreadgroup(self.group, consumer, {self.stream: ">"}, count=1,
                                                   block=int(wait_s * 1000))
        if not fresh or not fresh[0][1]:
            return None
        entry_id, fields = fresh[0][1][0]
        return self._chunk(entry_id, fields, 1)

    @staticmethod
    def _chunk(entry_id: bytes, fields: dict, deliveries: int) -> Chunk:
        value = {k.decode(): v.decode() for k, v in fields.items()}
        return Chunk(value["job"], int(value["n"]), int(value["start"]), int(value["count"]), entry_id.decode(),
                     int(value["top_k"]) or None, deliveries, value.get("owner") or None)

    async def started(self, chunk: Chunk) -> bool:
        async with self._calling():
            status = await self._start(keys=[self._key(chunk.job_id), self.queued], args=[chunk.job_id])
            if status in (b"queued", b"running"):
                return True
            await self._drop(chunk)
        return False

    async def _drop(self, chunk: Chunk) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, chunk.entry_id)
            pipe.xdel(self.stream, chunk.entry_id)
            pipe.delete(f"{self._key(chunk.job_id)}:in:{chunk.number}")
            await pipe.execute()

    async def inputs(self, chunk: Chunk) -> list[bytes] | None:
        async with self._calling():
            files = await self.redis.lrange(f"{self._key(chunk.job_id)}:in:{chunk.number}", 0, -1)
        return files if len(files) == chunk.count else None

    async def already_done(self, chunk: Chunk) -> bool:
        """Whether the chunk was completed (by the worker it was taken over from, between our claim and
        our read of its inputs); if so our delivery is acknowledged and there is nothing left to do."""
        async with self._calling():
            if not await self.redis.sismember(f"{self._key(chunk.job_id)}:done", str(chunk.number)):
                return False
            await self._drop(chunk)
        return True

    async def complete(self, chunk: Chunk, results: list[bytes]) -> str | None:
        job = chunk.job_id
        args: list = [job, chunk.number, chunk.entry_id, self.group, now_iso(), self.ttl_s]
        for i, result in enumerate(results):
            args += [chunk.start + i, result]
        meta = self._key(job)
        async with self._calling():
            status = await self._complete(keys=[meta, f"{meta}:out", f"{meta}:done", self.stream,
                                                f"{meta}:in:{chunk.number}", self.queued], args=args)
        return status.decode() if status else None

    async def retry(self, consumer: str, chunk: Chunk, delay_s: float) -> None:
        """Hand a chunk whose classification failed back in `delay_s` (to any replica): its entry stays
        pending, and its idle time is set so that it becomes claimable then (the delivery count rises
        with the claim)."""
        async with self._calling():
            await self.redis.xclaim(self.stream, self.group, consumer, 0, [chunk.entry_id],
                                    idle=max(0, self.visibility_ms - int(delay_s * 1000)), justid=True)

    async def abandon(self, chunk: Chunk, reason: str) -> str | None:
        status = await self._end(chunk.job_id, "failed", reason)
        async with self._calling():
            await self._drop(chunk)
        return status

    async def keep_alive(self, consumer: str, chunk: Chunk) -> None:
        async with self._calling():  # re-claiming our own entry resets its idle time
            await self.redis.xclaim(self.stream, self.group, consumer, 0, [chunk.entry_id], justid=True)

    async def stats(self) -> QueueStats:
        async with self._calling():
            chunks = await self.redis.xlen(self.stream)
            oldest = await self._oldest_queued(keys=[self.queued], args=[self._job_prefix])
        return QueueStats(chunks, time.time() - float(oldest[1]) if oldest else 0.0)

    def start(self) -> None:
        """Watch Redis with a PING every PROBE_INTERVAL_S (its own client, PROBE_TIMEOUT_S): a Redis that
        stopped answering opens the breaker within about half a second, so the next job call is refused
        at once instead of waiting out the API client's timeout."""
        if self.probe is not None and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._breaker.watch(self.probe.ping, PROBE_INTERVAL_S))

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            await self.probe.aclose()
        await self.redis.aclose()
        if self.blocking is not self.redis:
            await self.blocking.aclose()
