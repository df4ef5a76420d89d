"""Async batch jobs: what a job and a unit of its work are, the store contract, and the worker.

A job is split into chunks of at most `chunk_size` files. The store (Redis, or in-process without a
URL) holds each job's state, inputs and results, and hands chunks to every replica's workers; a
worker classifies a chunk on the low-priority lane of the shared batcher and writes its results by
input index, so a chunk computed twice (its first worker died after computing) is written twice to
the same slots: never lost, never duplicated.
"""

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

import orjson
from prometheus_client import Counter, Gauge

from predictor.core.errors import ApiError, Unavailable

log = logging.getLogger("predictor")

TERMINAL = ("succeeded", "failed", "cancelled")

JOBS = Counter("predictor_jobs_total", "Jobs by status reached on this replica (queued: submitted here)", ["status"])
JOB_QUEUE_CHUNKS = Gauge("predictor_job_queue_chunks", "Job chunks waiting or being worked on, all replicas",
                         multiprocess_mode="max")
JOB_OLDEST_QUEUED_AGE = Gauge("predictor_job_oldest_queued_age_seconds",
                              "Age of the oldest job still waiting for its first chunk to start, all replicas",
                              multiprocess_mode="max")

# What a worker calls: files (or the error reading one), top_k and the job's owner (whose cache
# entries it may read) -> one result or ApiError per file.
Classify = Callable[[list[bytes | ApiError], int | None, str | None], Awaitable[list[dict | ApiError]]]


class StoreUnavailable(Unavailable):
    """The job store cannot be reached (Redis down): callers get a clear 503, never a 500. What Redis
    said (`detail`) is for the log only: which Redis, and its words, are not the client's business."""

    def __init__(self, detail: str):
        super().__init__("job_store_unavailable", "The job store (Redis) cannot be reached; retry shortly.",
                         {"Retry-After": "5"})
        self.detail = detail


@dataclass
class Job:
    """A job's state as the API reports it (results are read separately, by page)."""

    job_id: str
    owner: str | None  # api key id of the creator (None with keys off)
    status: str
    total: int
    done: int
    created_at: str
    finished_at: str | None = None
    top_k: int | None = None
    error: str | None = None
    model_version: str | None = None  # the version of the model whose replicas compute it


@dataclass
class Chunk:
    """One unit of work handed to a worker: files [start, start + count) of a job."""

    job_id: str
    number: int
    start: int
    count: int
    entry_id: str = ""  # the store's handle (a Redis Stream entry id)
    top_k: int | None = None
    deliveries: int = 1
    owner: str | None = None


@dataclass
class QueueStats:
    chunks: int
    oldest_queued_age_s: float


class JobStore(Protocol):
    """Where jobs live; the Redis store is shared by every replica, the memory store by one process."""

    async def create(self, owner: str | None, files: list[bytes], top_k: int | None, chunk_size: int,
                     account: str | None = None) -> Job: ...
    async def get(self, job_id: str) -> Job | None: ...
    async def results(self, job_id: str, offset: int, limit: int) -> list[dict]: ...
    async def raw_results(self, job_id: str, offset: int, limit: int) -> list[bytes]: ...  # each as stored (JSON)
    def held_bytes(self, account: str) -> tuple[int, int]: ...  # input bytes kept in this process: all, account's
    async def cancel(self, job_id: str) -> bool: ...
    async def next_chunk(self, consumer: str, wait_s: float) -> Chunk | None: ...
    async def inputs(self, chunk: Chunk) -> list[bytes] | None: ...
    async def already_done(self, chunk: Chunk) -> bool: ...  # completed by a worker it was taken from
    async def started(self, chunk: Chunk) -> bool: ...
    async def complete(self, chunk: Chunk, results: list[bytes]) -> str | None: ...  # 'succeeded' if it ended the job
    async def retry(self, consumer: str, chunk: Chunk, delay_s: float) -> None: ...  # deliver again later
    async def abandon(self, chunk: Chunk, reason: str) -> str | None: ...  # 'failed' if it ended the job
    async def keep_alive(self, consumer: str, chunk: Chunk) -> None: ...
    async def stats(self) -> QueueStats: ...
    def start(self) -> None: ...  # with the app: background work of the store's own (a health probe)
    async def close(self) -> None: ...


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def encode_result(result: dict | ApiError) -> bytes:
    """One slot as stored: the classification, or the error object /classify/batch would show."""
    return orjson.dumps(result.body() if isinstance(result, ApiError) else result)


class JobWorker:
    """`concurrency` loops per process taking chunks from the store and classifying them.

    Two loops per process let one chunk decode while the other's batches are on the forward thread.
    A chunk whose classification raised is delivered again after a back-off; one delivered
    `max_deliveries` times (it keeps raising, or its workers keep dying on it) fails its job with an
    error that says which files, instead of taking replicas down forever. Results are stamped with
    `model_version`, the version that computed them.
    """

    def __init__(self, store: JobStore, classify: Classify, visibility_timeout_s: float, concurrency: int = 2,
                 max_deliveries: int = 5, stats_every_s: float = 5.0, piece_size: int = 32,
                 model_version: str | None = None, retry_delay_s: float = 0.5):
        self.store = store
        self.model_version = model_version
        self.retry_delay_s = retry_delay_s
        self.classify = classify
        self.visibility_timeout_s = visibility_timeout_s
        self.concurrency = concurrency
        self.max_deliveries = max_deliveries
        self.stats_every_s = stats_every_s
        self.piece_size = piece_size
        self._tasks: list[asyncio.Task] = []
        self._stopping = asyncio.Event()
        self._name = f"{socket.gethostname()}-{os.getpid()}"

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._tasks = [loop.create_task(self._consume(f"{self._name}-{n}"), name=f"job-worker-{n}")
                       for n in range(self.concurrency)]
        self._tasks.append(loop.create_task(self._publish_stats(), name="job-stats"))

    async def stop(self) -> None:
        """Stop at once, mid-chunk included: an unfinished chunk stays pending for another replica."""
        self._stopping.set()
        # redis-py can swallow a cancellation that lands inside a command; the loops also watch the
        # event, and the cancellation is repeated until every task has ended.
        while not all(task.done() for task in self._tasks):
            for task in self._tasks:
                task.cancel()
            await asyncio.wait(self._tasks, timeout=0.5)
        self._tasks = []

    async def _pause(self, seconds: float) -> None:
        """Sleep, but end early when the worker stops."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def _consume(self, consumer: str) -> None:
        wait_s = min(2.0, self.visibility_timeout_s / 2)
        store_down = False
        while not self._stopping.is_set():
            try:
                chunk = await self.store.next_chunk(consumer, wait_s)
                if store_down:
                    log.info("job store reachable again; %s resumes", consumer)
                    store_down = False
                if chunk is not None:
                    await self.work(consumer, chunk)
            except StoreUnavailable as exc:
                if not store_down:  # once per outage, not once per poll
                    log.warning("job store unavailable, %s waits for it: %s", consumer, exc.detail)
                    store_down = True
                await self._pause(1.0)
            except asyncio.CancelledError:
                raise
            except Exception:  # a store call failed mid-chunk: the chunk stays pending, the visibility timeout redelivers it
                log.exception("job chunk failed in %s; it will be retried after the visibility timeout", consumer)
                await self._pause(0.5)

    async def work(self, consumer: str, chunk: Chunk) -> None:
        """Classify one chunk and record its results (or drop it if its job was cancelled or is gone)."""
        files_named = f"files {chunk.start}..{chunk.start + chunk.count - 1}"
        if chunk.deliveries > self.max_deliveries:
            status = await self.store.abandon(chunk, f"chunk {chunk.number} ({files_named}) could not be classified "
                                                     f"in {chunk.deliveries - 1} attempts")
            self._count(status)
            return
        if not await self.store.started(chunk):
            return
        files = await self.store.inputs(chunk)
        if files is None:
            # Taken over just as its slow first worker completed it (which deletes the inputs): done, not lost.
            if not await self.store.already_done(chunk):
                self._count(await self.store.abandon(chunk, "the job's inputs expired before they were classified"))
            return
        finished = asyncio.Event()
        heartbeat = asyncio.get_running_loop().create_task(self._keep_alive(consumer, chunk, finished))
        try:
            try:
                # Piece by piece: the decode threads are shared with interactive calls, whose images
                # should not queue behind a whole chunk's.
                results = []
                for start in range(0, len(files), self.piece_size):
                    results += await self.classify(files[start:start + self.piece_size], chunk.top_k, chunk.owner)
            finally:  # no heartbeat may reset the claim once the chunk is finished or handed back
                finished.set()
                heartbeat.cancel()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s chunk %d (%s): classification failed on delivery %d of %d", chunk.job_id,
                          chunk.number, files_named, chunk.deliveries, self.max_deliveries)
            if chunk.deliveries >= self.max_deliveries:  # what went wrong is in the log, not in the job
                self._count(await self.store.abandon(chunk, f"chunk {chunk.number} ({files_named}) could not be "
                                                            f"classified in {chunk.deliveries} attempts"))
            else:
                await self.store.retry(consumer, chunk, min(self.retry_delay_s * 2 ** (chunk.deliveries - 1), 30.0))
            return
        self._count(await self.store.complete(chunk, [encode_result(self._stamped(r)) for r in results]))

    def _stamped(self, result: dict | ApiError) -> dict | ApiError:
        if isinstance(result, dict) and self.model_version is not None:
            return {**result, "model_version": self.model_version}
        return result

    async def _keep_alive(self, consumer: str, chunk: Chunk, finished: asyncio.Event) -> None:
        # A live worker on a slow chunk keeps its claim, so only a dead one's chunks are reclaimed.
        while not finished.is_set():
            try:
                await asyncio.wait_for(finished.wait(), self.visibility_timeout_s / 3)
            except TimeoutError:
                try:
                    await self.store.keep_alive(consumer, chunk)
                except StoreUnavailable:
                    pass

    async def _publish_stats(self) -> None:
        while not self._stopping.is_set():
            try:
                stats = await self.store.stats()
                JOB_QUEUE_CHUNKS.set(stats.chunks)
                JOB_OLDEST_QUEUED_AGE.set(stats.oldest_queued_age_s)
            except StoreUnavailable:
                pass
            await self._pause(self.stats_every_s)

    @staticmethod
    def _count(status: str | None) -> None:
        if status in TERMINAL:
            JOBS.labels(status).inc()
