"""The dynamic batcher on its own: stacking, ordering, isolation of failures, lone-request latency."""

import asyncio
import threading
import time

import numpy as np
import pytest

from predictor.batcher import DynamicBatcher


class RecordingForward:
    """A real forward function (sum of pixels per class slot) that records each batch it receives."""

    def __init__(self, delay: float = 0.0, fail_when=None):
        self.batches: list[int] = []
        self.delay = delay
        self.fail_when = fail_when
        self.threads: set[str] = set()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.batches.append(len(images))
        self.threads.add(threading.current_thread().name)
        if self.fail_when is not None and self.fail_when(images):
            raise RuntimeError("simulated CUDA out of memory")
        time.sleep(self.delay)
        return np.repeat(images.reshape(len(images), -1).sum(1, dtype=np.float32)[:, None], 10, axis=1)


def image(value: int, count: int = 1) -> np.ndarray:
    return np.full((count, 32, 32, 3), value, dtype=np.uint8)


def expected(value: int) -> float:
    return float(value) * 32 * 32 * 3


def test_concurrent_requests_share_forward_passes():
    forward = RecordingForward(delay=0.02)
    batcher = DynamicBatcher(forward, max_batch_size=32, max_delay_ms=5)

    async def main():
        return await asyncio.gather(*(batcher.submit(image(i % 200)) for i in range(100)))

    results = asyncio.run(main())
    for i, logits in enumerate(results):  # every caller gets its own row back
        assert logits.shape == (1, 10) and logits[0, 0] == expected(i % 200)
    assert sum(forward.batches) == 100
    assert max(forward.batches) <= 32 and len(forward.batches) <= 8
    assert forward.threads == {next(iter(forward.threads))} and "forward" in next(iter(forward.threads))


def test_lone_request_does_not_wait_for_a_full_batch():
    batcher = DynamicBatcher(RecordingForward(), max_batch_size=32, max_delay_ms=5)

    async def main():
        await batcher.submit(image(1))  # warm the worker
        started = time.perf_counter()
        await batcher.submit(image(2))
        return time.perf_counter() - started

    assert asyncio.run(main()) < 0.1


def test_large_request_is_split_and_reassembled_in_order():
    forward = RecordingForward()
    batcher = DynamicBatcher(forward, max_batch_size=8, max_delay_ms=1)
    images = np.concatenate([image(i) for i in range(20)])
    logits = asyncio.run(batcher.submit(images))
    assert [row[0] for row in logits] == [expected(i) for i in range(20)]
    assert max(forward.batches) <= 8


def test_failed_forward_fails_only_its_batch_and_the_batcher_recovers():
    forward = RecordingForward(fail_when=lambda images: (images == 66).any())
    batcher = DynamicBatcher(forward, max_batch_size=4, max_delay_ms=0)

    async def main():
        bad = await asyncio.gather(batcher.submit(image(66)), return_exceptions=True)
        good = await asyncio.gather(*(batcher.submit(image(i)) for i in range(6)))
        return bad, good

    bad, good = asyncio.run(main())
    assert isinstance(bad[0], RuntimeError)
    assert [g[0, 0] for g in good] == [expected(i) for i in range(6)]


def test_abandoned_request_does_not_break_others():
    batcher = DynamicBatcher(RecordingForward(delay=0.05), max_batch_size=4, max_delay_ms=1)

    async def main():
        abandoned = asyncio.ensure_future(batcher.submit(image(3)))
        await asyncio.sleep(0.01)
        abandoned.cancel()
        return await asyncio.gather(*(batcher.submit(image(i)) for i in range(5)))

    results = asyncio.run(main())
    assert [r[0, 0] for r in results] == [expected(i) for i in range(5)]


@pytest.mark.parametrize("size", [1, 3, 32])
def test_batch_sizes_never_exceed_the_limit(size):
    forward = RecordingForward(delay=0.01)
    batcher = DynamicBatcher(forward, max_batch_size=size, max_delay_ms=2)

    async def main():
        await asyncio.gather(*(batcher.submit(image(1, count=1 + i % 2)) for i in range(40)))

    asyncio.run(main())
    assert max(forward.batches) <= size
