"""The job store without Redis: one process's memory. Jobs are lost when it stops and are invisible to
other replicas; `python -m predictor` warns of that at start-up. For trials and single-replica use."""

import asyncio
import time
import uuid
from dataclasses import dataclass, field

import orjson

from predictor.jobs.core import Chunk, Job, QueueStats, now_iso


@dataclass
class _Entry:
    job: Job
    chunks: int
    inputs: dict[int, list[bytes]]
    results: dict[int, bytes] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    created: float = field(default_factory=time.time)
    expires: float = 0.0
    account: str | None = None  # whose bytes its inputs count as (QueuedBytes)


class MemoryJobStore:
    """JobStore in a dict and an asyncio queue; results expire `ttl_s` after the job's last change."""

    def __init__(self, ttl_s: int, model_version: str | None = None):
        self.ttl_s = ttl_s
        self.model_version = model_version
        self._jobs: dict[str, _Entry] = {}
        self._queue: asyncio.Queue[Chunk] = asyncio.Queue()

    def _live(self, job_id: str) -> _Entry | None:
        entry = self._jobs.get(job_id)
        if entry is not None and entry.expires < time.time():
            del self._jobs[job_id]
            return None
        return entry

    def _touch(self, entry: _Entry) -> None:
        entry.expires = time.time() + self.ttl_s

    def held_bytes(self, account: str) -> tuple[int, int]:
        """Bytes of the inputs not classified yet, of every live job and of `account`'s."""
        now, total, mine = time.time(), 0, 0
        for entry in self._jobs.values():
            if entry.inputs and entry.expires >= now:
                size = sum(len(f) for files in entry.inputs.values() for f in files)
                total += size
                mine += size if entry.account == account else 0
        return total, mine

    async def create(self, owner: str | None, files: list[bytes], top_k: int | None, chunk_size: int,
                     account: str | None = None) -> Job:
        for job_id in [k for k, e in self._jobs.items() if e.expires < time.time()]:
            del self._jobs[job_id]
        job = Job(uuid.uuid4().hex, owner, "queued", len(files), 0, now_iso(), top_k=top_k,
                  model_version=self.model_version)
        starts = range(0, len(files), chunk_size)
        entry = _Entry(job, len(starts), {n: files[s:s + chunk_size] for n, s in enumerate(starts)}, account=account)
        self._touch(entry)
        self._jobs[job.job_id] = entry
        for number, start in enumerate(starts):
            self._queue.put_nowait(Chunk(job.job_id, number, start, len(entry.inputs[number]), top_k=top_k, owner=owner))
        return job

    async def get(self, job_id: str) -> Job | None:
        entry = self._live(job_id)
        if entry is None:
            return None
        entry.job.done = len(entry.results)
        return entry.job

    async def results(self, job_id: str, offset: int, limit: int) -> list[dict]:
        return [orjson.loads(v) for v in await self.raw_results(job_id, offset, limit)]

    async def raw_results(self, job_id: str, offset: int, limit: int) -> list[bytes]:
        entry = self._live(job_id)
        if entry is None:
            return []
        return [entry.results[i] for i in range(offset, min(offset + limit, entry.job.total)) if i in entry.results]

    async def cancel(self, job_id: str) -> bool:
        return self._end(job_id, "cancelled", None)

    def _end(self, job_id: str, status: str, error: str | None) -> bool:
        entry = self._live(job_id)
        if entry is None or entry.job.status not in ("queued", "running"):
            return False
        entry.job.status, entry.job.finished_at, entry.job.error = status, now_iso(), error
        entry.inputs.clear()
        self._touch(entry)
        return True

    async def next_chunk(self, consumer: str, wait_s: float) -> Chunk | None:
        try:
            return await asyncio.wait_for(self._queue.get(), wait_s)
        except TimeoutError:
            return None

    async def inputs(self, chunk: Chunk) -> list[bytes] | None:
        entry = self._live(chunk.job_id)
        return None if entry is None else entry.inputs.get(chunk.number)

    async def already_done(self, chunk: Chunk) -> bool:
        entry = self._live(chunk.job_id)
        return entry is not None and chunk.number in entry.done

    async def retry(self, consumer: str, chunk: Chunk, delay_s: float) -> None:
        # The queue hands each chunk to one worker only: a failed one is put back, counted, after a back-off.
        chunk.deliveries += 1
        asyncio.get_running_loop().call_later(delay_s, self._queue.put_nowait, chunk)

    async def started(self, chunk: Chunk) -> bool:
        entry = self._live(chunk.job_id)
        if entry is None or entry.job.status not in ("queued", "running"):
            return False
        entry.job.status = "running"
        return True

    async def complete(self, chunk: Chunk, results: list[bytes]) -> str | None:
        entry = self._live(chunk.job_id)
        if entry is None or entry.job.status != "running":
            return None
        entry.results.update({chunk.start + i: r for i, r in enumerate(results)})
        entry.done.add(chunk.number)
        entry.inputs.pop(chunk.number, None)
        self._touch(entry)
        if len(entry.done) < entry.chunks:
            return None
        entry.job.status, entry.job.finished_at = "succeeded", now_iso()
        return "succeeded"

    async def abandon(self, chunk: Chunk, reason: str) -> str | None:
        return "failed" if self._end(chunk.job_id, "failed", reason) else None

    async def keep_alive(self, consumer: str, chunk: Chunk) -> None:
        return None  # one process: nobody else could take the chunk over

    async def stats(self) -> QueueStats:
        now = time.time()
        queued = [e.created for e in self._jobs.values() if e.job.status == "queued" and e.expires >= now]
        return QueueStats(self._queue.qsize(), time.time() - min(queued) if queued else 0.0)

    def start(self) -> None:
        pass  # nothing remote to watch

    async def close(self) -> None:
        self._jobs.clear()
