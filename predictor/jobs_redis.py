"""The job store on Redis, shared by every replica: state and results in hashes, work on a Stream.

Keys (all expire `ttl_s` after the job's last change):
  job:{id}            hash: owner, status, total, chunks, top_k, created_at, finished_at, error
  job:{id}:in:{n}     list: the files of chunk n (deleted once the chunk is done)
  job:{id}:out        hash: input index -> result JSON (written by index, so a redone chunk rewrites its slots)
  job:{id}:done       set: chunk numbers done; the job succeeds when it holds them all
  jobs:work           Stream of chunks, consumer group `workers` read by every replica
  jobs:queued         sorted set: id -> created (epoch s) of jobs not started yet (oldest-queued metric)

A replica that dies mid-chunk leaves the entry pending in the group; after `visibility_timeout_s`
without a heartbeat another replica takes it over with XAUTOCLAIM. Every state change that must be
atomic (finish a chunk, cancel, start) is one Lua script.
"""

import asyncio
import time
import uuid

import orjson
import redis.asyncio as redis
from redis.exceptions import RedisError, ResponseError

from .jobs import Chunk, Job, QueueStats, StoreUnavailable, now_iso

STREAM, GROUP, QUEUED = "jobs:work", "workers", "jobs:queued"

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


def unavailable(exc: RedisError) -> BaseException:
    """StoreUnavailable, unless the calling task is being cancelled: redis-py turns a command
    interrupted by cancellation into a connection error, and the cancellation must win."""
    task = asyncio.current_task()
    return asyncio.CancelledError() if task is not None and task.cancelling() else StoreUnavailable(str(exc))


class RedisJobStore:
    """JobStore on one Redis (`redis://[:password@]host:port/db`)."""

    def __init__(self, client: redis.Redis, ttl_s: int, visibility_timeout_s: float):
        self.redis = client
        self.ttl_s = ttl_s
        self.visibility_ms = int(visibility_timeout_s * 1000)
        self._complete = client.register_script(_COMPLETE)
        self._finish = client.register_script(_FINISH)
        self._start = client.register_script(_START)
        self._group_ready = False

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self.redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def create(self, owner: str | None, files: list[bytes], top_k: int | None, chunk_size: int) -> Job:
        job = Job(uuid.uuid4().hex, owner, "queued", len(files), 0, now_iso(), top_k=top_k)
        starts = range(0, len(files), chunk_size)
        try:
            await self._ensure_group()
            # One transaction: a job is either wholly queued or not at all (the client sees 503).
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(f"job:{job.job_id}", mapping={
                    "owner": owner or "", "status": "queued", "total": len(files), "chunks": len(starts),
                    "top_k": top_k or 0, "created_at": job.created_at})
                pipe.expire(f"job:{job.job_id}", self.ttl_s)
                for number, start in enumerate(starts):
                    key = f"job:{job.job_id}:in:{number}"
                    pipe.rpush(key, *files[start:start + chunk_size])
                    pipe.expire(key, self.ttl_s)
                    pipe.xadd(STREAM, {"job": job.job_id, "n": number, "start": start,
                                       "count": len(files[start:start + chunk_size]), "top_k": top_k or 0})
                pipe.zadd(QUEUED, {job.job_id: time.time()})
                await pipe.execute()
        except RedisError as exc:
            raise unavailable(exc) from exc
        return job

    async def get(self, job_id: str) -> Job | None:
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(f"job:{job_id}")
                pipe.hlen(f"job:{job_id}:out")
                meta, done = await pipe.execute()
        except RedisError as exc:
            raise unavailable(exc) from exc
        if not meta:
            return None
        text = {k.decode(): v.decode() for k, v in meta.items()}
        return Job(job_id, text["owner"] or None, text["status"], int(text["total"]), done, text["created_at"],
                   text.get("finished_at") or None, int(text.get("top_k", 0)) or None, text.get("error") or None)

    async def results(self, job_id: str, offset: int, limit: int) -> list[dict]:
        fields = list(range(offset, offset + limit))
        if not fields:
            return []
        try:
            values = await self.redis.hmget(f"job:{job_id}:out", fields)
        except RedisError as exc:
            raise unavailable(exc) from exc
        return [orjson.loads(v) for v in values if v is not None]

    async def cancel(self, job_id: str) -> bool:
        return await self._end(job_id, "cancelled", "") is not None

    async def _end(self, job_id: str, status: str, error: str) -> str | None:
        try:
            ended = await self._finish(keys=[f"job:{job_id}", QUEUED, f"job:{job_id}:out", f"job:{job_id}:done"],
                                       args=[job_id, now_iso(), self.ttl_s, status, error])
        except RedisError as exc:
            raise unavailable(exc) from exc
        return ended.decode() if ended else None

    async def next_chunk(self, consumer: str, wait_s: float) -> Chunk | None:
        """A chunk whose worker went silent for the visibility timeout, else a new one (waiting up to wait_s)."""
        try:
            await self._ensure_group()
            _, claimed, *_ = await self.redis.xautoclaim(STREAM, GROUP, consumer, self.visibility_ms, "0-0", count=1)
            if claimed:
                entry_id, fields = claimed[0]
                pending = await self.redis.xpending_range(STREAM, GROUP, entry_id, entry_id, 1)
                return self._chunk(entry_id, fields, pending[0]["times_delivered"] if pending else 2)
            fresh = await self.redis.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=1, block=int(wait_s * 1000))
        except RedisError as exc:
            self._group_ready = False  # a restarted Redis has lost the group: recreate it on the next call
            raise unavailable(exc) from exc
        if not fresh or not fresh[0][1]:
            return None
        entry_id, fields = fresh[0][1][0]
        return self._chunk(entry_id, fields, 1)

    @staticmethod
    def _chunk(entry_id: bytes, fields: dict, deliveries: int) -> Chunk:
        value = {k.decode(): v.decode() for k, v in fields.items()}
        return Chunk(value["job"], int(value["n"]), int(value["start"]), int(value["count"]), entry_id.decode(),
                     int(value["top_k"]) or None, deliveries)

    async def started(self, chunk: Chunk) -> bool:
        try:
            status = await self._start(keys=[f"job:{chunk.job_id}", QUEUED], args=[chunk.job_id])
            if status in (b"queued", b"running"):
                return True
            await self._drop(chunk)
        except RedisError as exc:
            raise unavailable(exc) from exc
        return False

    async def _drop(self, chunk: Chunk) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(STREAM, GROUP, chunk.entry_id)
            pipe.xdel(STREAM, chunk.entry_id)
            pipe.delete(f"job:{chunk.job_id}:in:{chunk.number}")
            await pipe.execute()

    async def inputs(self, chunk: Chunk) -> list[bytes] | None:
        try:
            files = await self.redis.lrange(f"job:{chunk.job_id}:in:{chunk.number}", 0, -1)
        except RedisError as exc:
            raise unavailable(exc) from exc
        return files if len(files) == chunk.count else None

    async def complete(self, chunk: Chunk, results: list[bytes]) -> str | None:
        job = chunk.job_id
        args: list = [job, chunk.number, chunk.entry_id, GROUP, now_iso(), self.ttl_s]
        for i, result in enumerate(results):
            args += [chunk.start + i, result]
        meta = f"job:{job}"
        try:
            status = await self._complete(keys=[meta, f"{meta}:out", f"{meta}:done", STREAM,
                                                f"{meta}:in:{chunk.number}", QUEUED], args=args)
        except RedisError as exc:
            raise unavailable(exc) from exc
        return status.decode() if status else None

    async def abandon(self, chunk: Chunk, reason: str) -> str | None:
        status = await self._end(chunk.job_id, "failed", reason)
        try:
            await self._drop(chunk)
        except RedisError as exc:
            raise unavailable(exc) from exc
        return status

    async def keep_alive(self, consumer: str, chunk: Chunk) -> None:
        try:  # re-claiming our own entry resets its idle time
            await self.redis.xclaim(STREAM, GROUP, consumer, 0, [chunk.entry_id], justid=True)
        except RedisError as exc:
            raise unavailable(exc) from exc

    async def stats(self) -> QueueStats:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xlen(STREAM)
                pipe.zrange(QUEUED, 0, 0, withscores=True)
                chunks, oldest = await pipe.execute()
        except RedisError as exc:
            raise unavailable(exc) from exc
        return QueueStats(chunks, time.time() - oldest[0][1] if oldest else 0.0)

    async def close(self) -> None:
        await self.redis.aclose()
