"""Async batch jobs: the stores and the worker against a real redis-server, the batcher's background
lane, and the HTTP API on real predictor processes sharing one Redis."""

import asyncio
import os
import signal
import socket
import statistics
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from redis import Redis

from predictor.core.batcher import DynamicBatcher
from predictor.jobs.core import JobWorker
from predictor.jobs.memory_store import MemoryJobStore
from predictor.jobs.redis_store import RedisJobStore
from predictor.redis_client import connect

from .conftest import MODEL_NAME, Server, encode, multipart, wait_for_job, wait_until
from .redis_server import RedisServer, redis_server  # noqa: F401  (a fixture)


# -- the store and the worker, in process -----------------------------------------------------------
def echo_classify(log: list | None = None):
    """A classify step that reports which file it saw: what the store does with results is under test here."""
    async def classify(files: list[bytes], top_k: int | None, owner: str | None = None) -> list[dict]:
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
    return lambda ttl_s=60, visibility_timeout_s=1.0: RedisJobStore(connect(redis_server.url, 10, retries=3), ttl_s,
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
        return RedisJobStore(connect(redis_server.url, 10, retries=3), 60, visibility_timeout_s)

    async def main():
        store = make_store(visibility_timeout_s=1.0)
        job = await store.create(None, files_named(10), None, chunk_size=4)
        stuck = asyncio.Event()

        async def dies_mid_chunk(files, top_k, owner):
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


def test_a_live_worker_on_a_slow_chunk_keeps_it(redis_server):
    """The heartbeat: a chunk that takes longer than the visibility timeout is not handed to a second worker
    (on its own Redis connection, as another replica). Redis only: the in-process store has one worker
    pool and never hands a chunk over, so there it could not fail."""
    def make_store(visibility_timeout_s: float) -> RedisJobStore:
        return RedisJobStore(connect(redis_server.url, 10, retries=3), 60, visibility_timeout_s)

    async def main():
        store = make_store(visibility_timeout_s=0.6)
        job = await store.create(None, files_named(2), None, chunk_size=2)
        slow_seen, fast_seen = [], []

        async def slow(files, top_k, owner):
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
        store = RedisJobStore(connect(redis_server.url, 10, retries=3), 60, visibility_timeout_s=0.2)
        job = await store.create(None, files_named(2), None, chunk_size=2)
        for _ in range(3):  # three workers die on it
            stuck = asyncio.Event()

            async def dies(files, top_k, owner, stuck=stuck):
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
        assert failed.status == "failed" and "could not be classified in 3 attempts" in failed.error

    asyncio.run(main())


def raises_on(poison: bytes, times: int | None = None, log: list | None = None):
    """A classify step whose decoding of `poison` raises (every time, or its first `times` times), as a
    decoder crash would: every other file is classified as echo_classify does."""
    failures = [0]

    async def classify(files: list[bytes], top_k: int | None, owner: str | None = None) -> list[dict]:
        if log is not None:
            log.extend(files)
        if poison in files and (times is None or failures[0] < times):
            failures[0] += 1
            raise RuntimeError("decoder crashed at 0x7f00deadbeef in <libpng state object>")
        return [{"file": f.decode()} for f in files]
    return classify


def test_a_chunk_that_raised_is_retried_and_then_succeeds(make_store):
    """A classification that raises once is delivered again (delivery count 2), not dropped."""
    async def main():
        store = make_store(visibility_timeout_s=0.4)
        files = files_named(4)
        job = await store.create(None, files, None, chunk_size=2)
        seen: list[bytes] = []
        worker = JobWorker(store, raises_on(b"file-3", times=1, log=seen), visibility_timeout_s=0.4,
                           max_deliveries=3, retry_delay_s=0.05)
        worker.start()
        done = await wait_for_status(store, job.job_id, ("succeeded", "failed"), timeout=20)
        await worker.stop()
        assert done.status == "succeeded", done
        assert await store.results(job.job_id, 0, 10) == [{"file": f"file-{i}"} for i in range(4)]
        assert seen.count(b"file-3") == 2 and seen.count(b"file-0") == 1

    asyncio.run(main())


def test_a_chunk_whose_classification_keeps_raising_fails_its_job(make_store):
    """After max_deliveries attempts the job is `failed`, with an error naming the files and none of
    the exception's internals."""
    async def main():
        store = make_store(visibility_timeout_s=0.4)
        job = await store.create(None, files_named(4), None, chunk_size=2)
        seen: list[bytes] = []
        worker = JobWorker(store, raises_on(b"file-2", log=seen), visibility_timeout_s=0.4, max_deliveries=3,
                           retry_delay_s=0.05)
        worker.start()
        failed = await wait_for_status(store, job.job_id, ("succeeded", "failed"), timeout=20)
        await worker.stop()
        assert failed.status == "failed" and failed.finished_at, failed
        assert failed.error == "chunk 1 (files 2..3) could not be classified in 3 attempts", failed.error
        assert seen.count(b"file-2") == 3

    asyncio.run(main())


def test_a_job_that_expires_while_queued_leaves_the_queue(make_store):
    """No worker runs: the job expires still queued. The oldest-queued age (the jobs-waiting alert)
    must drop back to 0 rather than grow for ever."""
    async def main():
        store = make_store(ttl_s=1)
        await store.create(None, files_named(2), None, chunk_size=2)
        assert (await store.stats()).oldest_queued_age_s < 1
        await asyncio.sleep(1.5)  # past the TTL (what expires it is time itself)
        assert (await store.stats()).oldest_queued_age_s == 0.0
        if isinstance(store, RedisJobStore):
            assert await store.redis.zcard(store.queued) == 0
        await store.close()

    asyncio.run(main())


def test_a_chunk_completed_by_its_slow_owner_as_it_is_taken_over_is_not_failed(redis_server):
    """The owner of chunk 0 misses its heartbeats; a second replica claims the chunk, the owner then
    completes it (deleting its inputs) before the second reads them. The job must not fail."""
    async def main():
        owner = RedisJobStore(connect(redis_server.url, 10, retries=3), 60, visibility_timeout_s=0.2)
        other = RedisJobStore(connect(redis_server.url, 10, retries=3), 60, visibility_timeout_s=0.2)
        job = await owner.create(None, files_named(8), None, chunk_size=2)
        slow = await owner.next_chunk("owner", 1.0)
        assert slow.number == 0 and await owner.started(slow)
        await asyncio.sleep(0.3)  # past the visibility timeout without a heartbeat
        taken = await other.next_chunk("other", 1.0)
        assert (taken.number, taken.deliveries) == (0, 2)
        files = await owner.inputs(slow)
        await owner.complete(slow, [b'{"file": "%s"}' % f for f in files])
        await JobWorker(other, echo_classify(), visibility_timeout_s=0.2).work("other", taken)
        assert (await owner.get(job.job_id)).status == "running"
        worker = JobWorker(other, echo_classify(), visibility_timeout_s=0.2)
        worker.start()
        done = await wait_for_status(owner, job.job_id, ("succeeded", "failed"))
        await worker.stop()
        assert done.status == "succeeded" and done.error is None, done
        assert await owner.results(job.job_id, 0, 10) == [{"file": f"file-{i}"} for i in range(8)]
        await owner.close()

    asyncio.run(main())


def test_the_in_process_store_counts_the_bytes_it_holds():
    async def main():
        store = MemoryJobStore(60)
        job = await store.create("k", [b"x" * 100, b"y" * 50], None, chunk_size=1, account="acct")
        await store.create("k", [b"z" * 10], None, chunk_size=1, account="other")
        assert store.held_bytes("acct") == (160, 150)
        worker = JobWorker(store, echo_classify(), visibility_timeout_s=1.0)
        worker.start()
        await wait_for_status(store, job.job_id, ("succeeded",))
        await worker.stop()
        assert store.held_bytes("acct")[1] == 0

    asyncio.run(main())


# -- the batcher's background lane -----------------------------------------------------------------
def test_interactive_calls_overtake_queued_job_work():
    """A job's 256 images are queued first; an interactive call arriving next rides in the next forward
    pass, not behind the whole job, and while it is in flight job work runs in quarter batches."""
    batches: list[list[int]] = []
    in_flight = [0]

    def forward(images: np.ndarray) -> np.ndarray:  # stands in for the network: tags rows by pixel value
        batches.append(images[:, 0, 0, 0].tolist())
        time.sleep(0.05)
        return np.repeat(images[:, 0, 0, :1].astype(np.float32), 10, axis=1)

    batcher = DynamicBatcher(forward, max_batch_size=32, max_delay_ms=2, in_flight=lambda: in_flight[0])

    async def main():
        job = asyncio.ensure_future(batcher.submit(np.full((256, 32, 32, 3), 1, np.uint8), background=True))
        while not batches:  # until the first job batch is on the forward thread
            await asyncio.sleep(0.001)
        in_flight[0] += 1  # admitted by the guard, as the interactive call is while it runs
        interactive = await batcher.submit(np.full((4, 32, 32, 3), 2, np.uint8))
        in_flight[0] -= 1
        assert interactive[0, 0] == 2 and not job.done()
        assert len(await job) == 256

    asyncio.run(main())
    assert [i for i, values in enumerate(batches) if 2 in values] == [1], batches  # right after the running one
    sizes = [len(b) for b in batches]
    assert sizes[0] == 32 and sizes[1] == 4 + 8, sizes  # the call's batch: itself and a quarter batch of job work
    assert set(sizes[3:-1]) == {32} and sum(sizes) == 260, sizes  # whole batches again once it has gone


# -- the HTTP API on real replicas sharing one Redis -------------------------------------------------
KEYS = {"a": "job-key-a", "b": "job-key-b", "c": "job-key-c"}
BAD_FILES = [b"", b"plain text, not an image", None]  # None: a truncated JPEG, made from a real one


def auth(name: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def submit(server: Server, files: list[bytes], key: str = "a", **params) -> dict:
    response = server.client.post("/classify/jobs", files=multipart(files), params=params, headers=auth(key))
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == body["status_url"] == f"/classify/jobs/{body['job_id']}"
    assert body["status"] == "queued"
    return body


def batch_answers(server: Server, files: list[bytes], key: str = "a") -> list[dict]:
    """What /classify/batch says about the same files, 64 at a time, each result stamped with the
    model_version of the response as a job's results are: a job's results must match it."""
    answers = []
    for start in range(0, len(files), 64):
        response = server.client.post("/classify/batch", files=multipart(files[start:start + 64]), headers=auth(key))
        assert response.status_code == 200, response.text
        version = response.json()["model_version"]
        answers += [r if "error" in r else {**r, "model_version": version} for r in response.json()["results"]]
    return answers


def replica(redis_url: str, *args: str) -> Server:
    return Server("--redis_url", redis_url, "--job_chunk_size", "16", "--job_visibility_timeout_s", "2",
                  "--rate_limit_per_minute", "300", *args,
                  env={"API_KEYS": ",".join(KEYS.values()), "KEY_ID_SECRET": "jobs-test-key-id-secret-0123456789abcdef"})


@pytest.fixture(scope="module")
def replicas():
    """Two replicas sharing one redis-server, API keys on, results kept 8 s."""
    redis = RedisServer()
    servers = [replica(redis.url, "--job_ttl_s", "8") for _ in range(2)]
    yield servers
    for server in servers:
        server.stop()
    redis.stop()


def test_a_job_submitted_to_one_replica_is_read_on_another(replicas, holdout):
    first, second = replicas
    truncated = holdout[0][0][: len(holdout[0][0]) // 2]
    files = [data for data, _ in holdout[:40]] + [f if f is not None else truncated for f in BAD_FILES]
    job = submit(first, files)
    done = wait_for_job(second, job["job_id"], ("succeeded",), headers=auth("a"))
    assert done["progress"] == {"done": len(files), "total": len(files)} and done["finished_at"] >= done["created_at"]
    assert done["next_offset"] is None
    assert done["results"] == batch_answers(second, files)  # same answers, same order, bad files in their slots
    assert [r["error"]["code"] for r in done["results"][-3:]] == ["empty_file", "unsupported_media_type", "invalid_image"]
    page = wait_for_job(first, job["job_id"], ("succeeded",), headers=auth("a"), offset=10, limit=20)
    assert page["results"] == done["results"][10:30] and page["next_offset"] == 30


def test_a_job_is_visible_only_to_its_key(replicas, holdout):
    first, second = replicas
    job = submit(first, [holdout[0][0]], key="a")
    url = f"/classify/jobs/{job['job_id']}"
    for method in ("GET", "DELETE"):
        other = second.client.request(method, url, headers=auth("b"))
        assert other.status_code == 404 and other.json()["error"]["code"] == "job_not_found", other.text
        anonymous = second.client.request(method, url)
        assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "unauthorized"
    assert second.client.post("/classify/jobs", files=multipart([holdout[0][0]])).status_code == 401
    assert wait_for_job(second, job["job_id"], ("succeeded",), headers=auth("a"))["progress"]["done"] == 1
    assert second.client.get("/classify/jobs/not-a-job", headers=auth("a")).status_code == 404


def test_cancel_and_the_rate_limit_by_files(replicas, holdout):
    """A 400-file job is cancelled while it runs, and costs its key 400 rate-limit tokens (300/min): the
    key's next call is refused, another key's is not."""
    first, second = replicas
    job = submit(first, [data for data, _ in holdout[:400]], key="c")
    cancelled = second.client.delete(f"/classify/jobs/{job['job_id']}", headers=auth("c"))
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["finished_at"]
    # Time for a worker that ignored the cancellation to finish the job (400 images take ~1 s here),
    # which the assertion on `done` below would then catch: a state to wait for does not exist.
    time.sleep(2)
    later = wait_for_job(first, job["job_id"], ("cancelled",), headers=auth("c"))
    assert later["progress"]["done"] < 400 and "results" not in later
    again = first.client.delete(f"/classify/jobs/{job['job_id']}", headers=auth("c"))
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    limited = first.client.post("/classify/image", files={"file": holdout[0][0]}, headers=auth("c"))
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
    assert first.client.post("/classify/image", files={"file": holdout[0][0]}, headers=auth("b")).status_code == 200


def test_results_expire(replicas, holdout):
    first, _ = replicas
    job = submit(first, [holdout[1][0]], key="b")
    wait_for_job(first, job["job_id"], ("succeeded",), headers=auth("b"))
    finished = time.monotonic()
    gone = wait_until(lambda: (r := first.client.get(f"/classify/jobs/{job['job_id']}", headers=auth("b"))).status_code
                      == 404 and r, 30, "the finished job to expire (--job_ttl_s 8)", interval=0.5)
    assert gone.json()["error"]["code"] == "job_not_found"
    assert time.monotonic() - finished > 5, "gone long before its TTL"  # 8 s, less the polling's slack


def test_job_limits_are_4xx_json(replicas, holdout):
    first, _ = replicas
    for response, status, code in (
        (first.client.post("/classify/jobs", headers=auth("a")), 422, "invalid_request"),
        (first.client.post("/classify/jobs?top_k=11", files=multipart([holdout[0][0]]), headers=auth("a")), 422,
         "invalid_request"),
    ):
        assert response.status_code == status and response.json()["error"]["code"] == code, response.text


def test_limits_of_a_job(redis_server, holdout):
    """Jobs have limits of their own: more files than --max_batch_files and a body over --max_body_bytes
    are fine up to --max_job_files and --max_job_bytes, then 413; each file is held to the single-image
    limit (--max_body_bytes), and a flood of parts stops the parser at --max_job_files + 1."""
    server = Server("--redis_url", redis_server.url, "--max_batch_files", "2", "--max_body_bytes", "10000",
                    "--max_job_files", "5", "--max_job_bytes", "200000", "--rate_limit_per_minute", "0",
                    "--job_owner_header", "x-jwt-owner")
    server.client.headers["x-jwt-owner"] = "alice"  # what Istio copies from the token's subject
    try:
        small = [data for data, _ in holdout[:6]]
        assert server.client.post("/classify/jobs", files=multipart(small[:5])).status_code == 202
        too_many = server.client.post("/classify/jobs", files=multipart(small))
        assert too_many.status_code == 413 and too_many.json()["error"]["code"] == "too_many_files", too_many.text
        flood = server.client.post("/classify/jobs", files=multipart([b"x"] * 1000))
        assert flood.status_code == 413 and flood.json()["error"] == {
            "code": "too_many_files", "message": "More than 5 files per job."}, flood.text  # the parser stopped
        medium = b"\xff\xd8\xff" + bytes(9000)
        assert server.client.post("/classify/jobs", files=multipart([medium] * 3)).status_code == 202
        large = b"\xff\xd8\xff" + bytes(15000)
        assert server.client.post("/classify/batch", files=multipart([large])).status_code == 413
        one_too_large = server.client.post("/classify/jobs", files=multipart([medium, large]))
        assert one_too_large.status_code == 413, one_too_large.text
        assert one_too_large.json()["error"]["code"] == "file_too_large", one_too_large.text
        too_big = server.client.post("/classify/jobs", files=multipart([medium] * 5 + [bytes(160000)]))
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "payload_too_large", too_big.text
        # Without API keys the token's subject owns the job: another subject, or none, cannot see it.
        job = server.client.post("/classify/jobs", files=multipart([medium])).json()
        assert server.client.get(job["status_url"]).status_code == 200
        assert server.client.get(job["status_url"], headers={"x-jwt-owner": "bob"}).status_code == 404
        anonymous = httpx.post(f"{server.url}/classify/jobs", files=multipart([medium]))
        assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "unauthorized"
    finally:
        server.stop()


def test_kill_9_of_the_replica_working_a_job_loses_nothing(redis_server, holdout):
    """The replica working a job is killed mid-chunk; another replica takes its chunks over after the
    visibility timeout, and the job succeeds with every result, once, in order."""
    files = [data for data, _ in holdout[:600]]
    doomed = replica(redis_server.url, "--job_chunk_size", "150")
    job = submit(doomed, files)
    probe = Redis.from_url(redis_server.url)
    deadline = time.monotonic() + 60
    meta = f"job:{MODEL_NAME}:{job['job_id']}"
    while probe.hget(meta, "status") != b"running" and time.monotonic() < deadline:
        time.sleep(0.02)
    doomed.process.kill()  # SIGKILL: nothing is acknowledged, nothing cleaned up
    doomed.process.wait()
    (stream,) = probe.keys("jobs:*:work")
    group = "workers:" + stream.decode().removeprefix("jobs:").removesuffix(":work")
    in_flight, done = probe.xpending(stream, group)["pending"], probe.hlen(f"{meta}:out")
    assert in_flight > 0 and done < 600, (in_flight, done)  # it died holding unfinished work
    survivor = replica(redis_server.url)
    try:
        done = wait_for_job(survivor, job["job_id"], ("succeeded",), headers=auth("a"), limit=1000, timeout=180)
        assert len(done["results"]) == 600 and done["progress"] == {"done": 600, "total": 600}
        assert done["results"] == batch_answers(survivor, files)
    finally:
        survivor.stop()
        doomed.stop()


# -- rollouts, bounds and outages on real replicas -------------------------------------------------
def test_two_model_versions_on_one_redis_compute_only_their_own_jobs(redis_server, holdout):
    """A canary (other weights) and the stable model share one Redis: each job is computed by the
    version it was submitted to, says so in every result, and is readable on either replica."""
    stable = replica(redis_server.url)
    canary = replica(redis_server.url, "--random_weights")
    try:
        files = [data for data, _ in holdout[60:68]]
        jobs = [(stable, submit(stable, files)) for _ in range(4)] + [(canary, submit(canary, files)) for _ in range(2)]
        answers = {server.port: batch_answers(server, files, key="b") for server in (stable, canary)}
        versions = {port: results[0]["model_version"] for port, results in answers.items()}
        assert versions[stable.port] != versions[canary.port]
        for server, job in jobs:
            other = canary if server is stable else stable
            done = wait_for_job(other, job["job_id"], ("succeeded",), headers=auth("a"))  # read through the other version's replica
            assert done["model_version"] == versions[server.port]
            assert done["results"] == answers[server.port]
    finally:
        canary.stop()
        stable.stop()


def test_a_frozen_redis_fails_job_calls_fast_without_its_address(redis_server, holdout):
    """Redis stopped with SIGSTOP (it accepts connections and never answers): the background health check
    opens the breaker, so even the first job call after the outage fails at once (not after the store's
    3 s timeout), each a 503 that names no address."""
    server = Server("--redis_url", redis_server.url, "--rate_limit_per_minute", "0")
    try:
        accepted = server.client.post("/classify/jobs", files=multipart([holdout[0][0]]))
        assert accepted.status_code == 202, accepted.text
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        try:
            # A fixed time, on purpose: the probe's period and timeout (0.25 s each) pass, and no more. A wait
            # for the breaker's log line would also end when the job worker's own blocked read opened it,
            # and then passes without the probe (tried: it did).
            time.sleep(0.6)
            timings = []
            for method, url in (("POST", "/classify/jobs"), ("POST", "/classify/jobs"),
                                ("GET", accepted.json()["status_url"])):
                started = time.monotonic()
                response = server.client.request(method, url, files=multipart([holdout[1][0]]) if method == "POST" else None)
                timings.append(time.monotonic() - started)
                assert response.status_code == 503, response.text
                error = response.json()["error"]
                assert error["code"] == "job_store_unavailable" and "Redis" in error["message"]
                assert str(redis_server.port) not in error["message"] and "127.0.0.1" not in error["message"]
            assert max(timings) < 0.5, timings
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)
        wait_until(lambda: server.client.post("/classify/jobs", files=multipart([holdout[1][0]])).status_code == 202, 30,
                   "job calls to be accepted again", interval=0.5)
    finally:
        server.stop()


def raw_job_upload(server: Server, key: str, declared: int, sent: int) -> socket.socket:
    """A job upload that declares `declared` bytes and sends only `sent` of them (a slow client)."""
    boundary = "slowupload"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall((f"POST /classify/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[key]}\r\n"
                  f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {declared}\r\n\r\n").encode()
                 + head + bytes(sent - len(head)))
    return sock


def test_job_bytes_held_are_capped_per_key_and_per_replica():
    """Uploads in progress count against the caps (the in-process store's queued inputs too): a slow
    50 kB upload from key a leaves a 20 kB job from a refused (per key, 60 kB) and a 40 kB job from c
    refused (per replica, 80 kB), while b's 20 kB is taken; a job larger than the per-key cap is 413."""
    server = Server("--max_job_bytes", "80000", "--max_job_queued_bytes", "80000", "--max_job_queued_bytes_per_key",
                    "60000", "--rate_limit_per_minute", "0", env={"API_KEYS": ",".join(KEYS.values())})
    try:
        def job(key: str, size: int) -> httpx.Response:
            return server.client.post("/classify/jobs", files=multipart([b"\xff\xd8\xff" + bytes(size)]),
                                      headers=auth(key))

        huge = job("a", 70000)
        assert huge.status_code == 413 and huge.json()["error"]["code"] == "job_too_large", huge.text
        slow = raw_job_upload(server, "a", declared=50000, sent=1000)
        try:
            deadline = time.monotonic() + 20
            while (refused := job("a", 20000)).status_code == 202:  # until the slow upload is admitted
                assert time.monotonic() < deadline, "the slow upload was never counted"
                slow.setblocking(False)
                try:
                    answered = slow.recv(1024)  # refused while the accepted job's bytes were held: again
                except BlockingIOError:
                    answered = b""
                if answered:
                    slow.close()
                    slow = raw_job_upload(server, "a", declared=50000, sent=1000)
                time.sleep(0.1)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "job_queue_full", refused.text
            assert refused.headers["retry-after"]
            assert job("b", 20000).status_code == 202
            full = job("c", 40000)
            assert full.status_code == 503 and full.json()["error"]["code"] == "job_queue_full", full.text
        finally:
            slow.close()
        deadline = time.monotonic() + 20
        while (later := job("a", 20000)).status_code != 202:  # the abandoned upload no longer counts
            assert time.monotonic() < deadline, later.text
            time.sleep(0.1)
    finally:
        server.stop()


def test_job_reads_pass_the_guard_with_a_budget_of_their_own(holdout):
    """Status reads are rate-limited (3 a minute here) apart from predictions (2 a minute): a key
    that has spent its prediction budget can still poll, within its read budget; pages are bounded."""
    server = Server("--job_reads_per_minute", "3", "--rate_limit_per_minute", "2",
                    env={"API_KEYS": ",".join(KEYS.values())})
    try:
        job = submit(server, [holdout[0][0]])
        assert server.client.post("/classify/image", files={"file": holdout[0][0]}, headers=auth("a")).status_code == 200
        limited = server.client.post("/classify/image", files={"file": holdout[0][0]}, headers=auth("a"))
        assert limited.status_code == 429
        url = job["status_url"]
        too_long = server.client.get(url, params={"limit": 1001}, headers=auth("a"))
        assert too_long.status_code == 422 and too_long.json()["error"]["code"] == "invalid_request"
        assert [server.client.get(url, headers=auth("a")).status_code for _ in range(2)] == [200, 200]
        read_limited = server.client.get(url, headers=auth("a"))
        assert read_limited.status_code == 429 and read_limited.json()["error"]["code"] == "rate_limited"
        assert server.client.get(url, headers=auth("b")).status_code == 404  # b's own read budget
        assert server.client.get(url).status_code == 401
        assert 'endpoint="job_status"' not in server.client.get("/metrics").text  # api_* count predictions only
    finally:
        server.stop()


def heavy_png(seed: int) -> bytes:
    """A 4096 x 4096 PNG of ~5 MB (a gradient with one noisy bit): slow to inflate and to resize."""
    x = np.arange(4096, dtype=np.int64) % 251
    pixels = np.stack([np.add.outer(x, x * 0 + seed) % 256, np.add.outer(x * 0, x), np.full((4096, 4096), seed)],
                      -1).astype(np.uint8)
    pixels[..., 0] ^= np.random.default_rng(seed).integers(0, 2, (4096, 4096), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "PNG")


def test_job_decoding_does_not_hold_up_interactive_calls(holdout):
    """A job of 30 large PNGs decodes beside interactive calls: their p50 stays near idle and none waits
    behind the job's images (on the shared decode threads they did: up to 7.8 s each)."""
    server = Server("--rate_limit_per_minute", "0", "--cache_ttl_s", "0", "--max_job_bytes", str(200 * 1024 * 1024),
                    "--max_body_bytes", str(8 * 1024 * 1024))
    try:
        heavy = [heavy_png(seed) for seed in range(3)]
        images = [data for data, _ in holdout[:200]]

        def latency(data: bytes) -> float:
            started = time.perf_counter()
            assert server.client.post("/classify/image", files={"file": data}).status_code == 200
            return time.perf_counter() - started

        idle = statistics.median(latency(images[i]) for i in range(40))
        job = server.client.post("/classify/jobs", files=multipart([heavy[i % 3] for i in range(30)]))
        assert job.status_code == 202, job.text
        beside = []
        while len(beside) < 5 or server.client.get(job.json()["status_url"], params={"limit": 1}).json()["status"] != "succeeded":
            beside += [latency(images[40 + (len(beside) + i) % 160]) for i in range(5)]
        busy = statistics.median(beside)
        # The target is 2x idle (measured 1.3x to 1.9x here); the bound leaves room for a loaded 2-core
        # runner. What the shared pool breaks is the worst call (12.9 s there), bounded at 1 s.
        assert busy <= 2.5 * idle and max(beside) < 1.0, (idle, busy, max(beside), len(beside))
    finally:
        server.stop()
