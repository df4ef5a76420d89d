"""Async batch jobs: the stores and the worker against a real redis-server, the batcher's background
lane, and the HTTP API on real predictor processes sharing one Redis."""

import asyncio
import time

import numpy as np
import pytest

from predictor.batcher import DynamicBatcher
from predictor.jobs import JobWorker
from predictor.jobs_memory import MemoryJobStore
from predictor.jobs_redis import RedisJobStore
from predictor.redis_client import connect

from .redis_server import redis_server  # noqa: F401  (a fixture)


# -- the store and the worker, in process -----------------------------------------------------------
def echo_classify(log: list | None = None):
    """A classify step that reports which file it saw: what the store does with results is under test here."""
    async def classify(files: list[bytes], top_k: int | None) -> list[dict]:
        if log is not None:
            log.extend(files)
        return [{"file": f.decode()} for f in files]
    return classify


def files_named(count: int) -> list[bytes]:
    return [f"file-{i}".encode() for i in range(count)]


async def wait_for_status(store, job_id: str, statuses: tuple[str, ...], timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = await store.get(job_id)
        if job is not None and job.status in statuses:
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} not {statuses} after {timeout} s: {await store.get(job_id)}")


@pytest.fixture(params=["redis", "memory"])
def make_store(request):
    """A factory of stores of either kind (several Redis stores share one redis-server, as replicas do)."""
    if request.param == "memory":
        shared = {}
        return lambda ttl_s=60, visibility_timeout_s=1.0: shared.setdefault("store", MemoryJobStore(ttl_s))
    redis_server = request.getfixturevalue("redis_server")
    return lambda ttl_s=60, visibility_timeout_s=1.0: RedisJobStore(connect(redis_server.url, 10), ttl_s,
                                                                    visibility_timeout_s)


def test_a_job_runs_in_input_order_and_reports_progress(make_store):
    async def main():
        store = make_store()
        job = await store.create("owner-a", files_named(10), 3, chunk_size=4)
        assert (job.status, job.total, job.owner, job.top_k) == ("queued", 10, "owner-a", 3)
        worker = JobWorker(store, echo_classify(), visibility_timeout_s=1.0)
        worker.start()
        done = await wait_for_status(store, job.job_id, ("succeeded",))
        await worker.stop()
        assert (done.done, done.total) == (10, 10) and done.finished_at
        assert await store.results(job.job_id, 0, 100) == [{"file": f"file-{i}"} for i in range(10)]
        assert await store.results(job.job_id, 7, 2) == [{"file": "file-7"}, {"file": "file-8"}]
        assert await store.get("0" * 32) is None

    asyncio.run(main())


def test_a_dead_workers_chunk_is_taken_over_none_lost_none_duplicated(redis_server):
    """A worker that dies mid-chunk (cancelled while classifying: nothing acknowledged) leaves its chunk
    pending; another worker, on its own Redis connection, claims it after the visibility timeout."""
    def make_store(visibility_timeout_s: float) -> RedisJobStore:
        return RedisJobStore(connect(redis_server.url, 10), 60, visibility_timeout_s)

    async def main():
        store = make_store(visibility_timeout_s=1.0)
        job = await store.create(None, files_named(10), None, chunk_size=4)
        stuck = asyncio.Event()

        async def dies_mid_chunk(files, top_k):
            stuck.set()
            await asyncio.Event().wait()

        doomed = JobWorker(store, dies_mid_chunk, visibility_timeout_s=1.0, concurrency=1)
        doomed.start()
        await stuck.wait()
        await doomed.stop()
        seen: list[bytes] = []
        survivor = JobWorker(make_store(visibility_timeout_s=1.0), echo_classify(seen), visibility_timeout_s=1.0)
        survivor.start()
        await wait_for_status(store, job.job_id, ("succeeded",))
        await survivor.stop()
        assert await store.results(job.job_id, 0, 100) == [{"file": f"file-{i}"} for i in range(10)]
        assert sorted(seen) == sorted(files_named(10))  # every file classified exactly once by the survivor

    asyncio.run(main())


def test_a_live_worker_on_a_slow_chunk_keeps_it(make_store):
    """The heartbeat: a chunk that takes longer than the visibility timeout is not handed to a second worker."""
    async def main():
        store = make_store(visibility_timeout_s=0.6)
        job = await store.create(None, files_named(2), None, chunk_size=2)
        slow_seen, fast_seen = [], []

        async def slow(files, top_k):
            slow_seen.extend(files)
            await asyncio.sleep(2.5)
            return [{"file": f.decode()} for f in files]

        first = JobWorker(store, slow, visibility_timeout_s=0.6, concurrency=1)
        first.start()
        while not slow_seen:
            await asyncio.sleep(0.02)
        second = JobWorker(make_store(visibility_timeout_s=0.6), echo_classify(fast_seen), visibility_timeout_s=0.6)
        second.start()
        await wait_for_status(store, job.job_id, ("succeeded",))
        await asyncio.gather(first.stop(), second.stop())
        assert fast_seen == []

    asyncio.run(main())


def test_cancel_stops_the_remaining_chunks(make_store):
    async def main():
        store = make_store()
        job = await store.create(None, files_named(6), None, chunk_size=2)
        assert await store.cancel(job.job_id) is True
        assert await store.cancel(job.job_id) is False  # already ended
        seen: list[bytes] = []
        worker = JobWorker(store, echo_classify(seen), visibility_timeout_s=1.0)
        worker.start()
        await asyncio.sleep(1.0)
        await worker.stop()
        cancelled = await store.get(job.job_id)
        assert (cancelled.status, cancelled.done, seen) == ("cancelled", 0, [])
        assert cancelled.finished_at

    asyncio.run(main())


def test_results_expire_after_the_ttl(make_store):
    async def main():
        store = make_store(ttl_s=1)
        job = await store.create(None, files_named(2), None, chunk_size=2)
        worker = JobWorker(store, echo_classify(), visibility_timeout_s=1.0)
        worker.start()
        await wait_for_status(store, job.job_id, ("succeeded",))
        await worker.stop()
        await asyncio.sleep(2.2)
        assert await store.get(job.job_id) is None
        assert await store.results(job.job_id, 0, 10) == []

    asyncio.run(main())


def test_a_chunk_that_keeps_killing_workers_fails_its_job(redis_server):
    async def main():
        store = RedisJobStore(connect(redis_server.url, 10), 60, visibility_timeout_s=0.2)
        job = await store.create(None, files_named(2), None, chunk_size=2)
        for _ in range(3):  # three workers die on it
            stuck = asyncio.Event()

            async def dies(files, top_k, stuck=stuck):
                stuck.set()
                await asyncio.Event().wait()

            doomed = JobWorker(store, dies, visibility_timeout_s=0.2, concurrency=1, max_deliveries=3)
            doomed.start()
            await stuck.wait()
            await doomed.stop()
        worker = JobWorker(store, echo_classify(), visibility_timeout_s=0.2, concurrency=1, max_deliveries=3)
        worker.start()
        failed = await wait_for_status(store, job.job_id, ("failed", "succeeded"))
        await worker.stop()
        assert failed.status == "failed" and "abandoned by 3 workers" in failed.error

    asyncio.run(main())


# -- the batcher's background lane -----------------------------------------------------------------
def test_interactive_calls_overtake_queued_job_work():
    """A job's 8 batches are queued first; an interactive call arriving next rides in the next
    forward pass, not behind the whole job."""
    batches: list[set[int]] = []

    def forward(images: np.ndarray) -> np.ndarray:  # stands in for the network: tags rows by pixel value
        batches.append(set(images[:, 0, 0, 0].tolist()))
        time.sleep(0.05)
        return np.repeat(images[:, 0, 0, :1].astype(np.float32), 10, axis=1)

    batcher = DynamicBatcher(forward, max_batch_size=32, max_delay_ms=2, in_flight=lambda: 1)

    async def main():
        job = asyncio.ensure_future(batcher.submit(np.full((256, 32, 32, 3), 1, np.uint8), background=True))
        await asyncio.sleep(0.02)  # the first job batch is on the forward thread
        interactive = await batcher.submit(np.full((4, 32, 32, 3), 2, np.uint8))
        assert interactive[0, 0] == 2 and not job.done()
        assert len(await job) == 256

    asyncio.run(main())
    assert [i for i, values in enumerate(batches) if 2 in values] == [1], batches  # right after the running one
    assert len(batches) == 9
