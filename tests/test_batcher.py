"""The dynamic batcher on its own: stacking, ordering, isolation of failures, the lone-request fast path,
and that abandoned requests are never computed.

The forward pass here is a stub, not the network: it tags each output row with its input's pixel value,
so a test can tell which request's rows came back where and which images were computed at all.
The batcher is wired as the model wires it, with the guard's count of admitted calls (`Drain`).
"""

import asyncio
import contextlib
import threading
import time

import numpy as np
import pytest

from predictor.core.batcher import FORWARD_FAILED, DynamicBatcher
from predictor.core.drain import Drain
from predictor.core.errors import InferenceFailed


class StubForward:
    """A stand-in forward pass: each image's output row is its pixel value, repeated over 10 classes.
    It records every batch it is given (the pixel values, in order) and the thread it ran on."""

    def __init__(self, delay: float = 0.0, fail_when=None):
        self.batches: list[list[int]] = []
        self.delay = delay
        self.fail_when = fail_when
        self.threads: set[str] = set()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.batches.append([int(value) for value in images[:, 0, 0, 0]])
        self.threads.add(threading.current_thread().name)
        if self.fail_when is not None and self.fail_when(images):
            raise RuntimeError("simulated CUDA out of memory")
        time.sleep(self.delay)
        return np.repeat(images[:, 0, 0, :1].astype(np.float32), 10, axis=1)

    @property
    def computed(self) -> list[int]:
        return [value for batch in self.batches for value in batch]


def wired(forward: StubForward, max_batch_size: int, max_delay_ms: float,
          inline_lone_calls: bool = False) -> tuple[DynamicBatcher, Drain]:
    """A batcher that knows how many calls are admitted, as the model builds it."""
    drain = Drain()
    return DynamicBatcher(forward, max_batch_size, max_delay_ms, in_flight=drain.calls_in_flight,
                          inline_lone_calls=inline_lone_calls), drain


@contextlib.asynccontextmanager
async def admitted(drain: Drain):
    """One call counted in flight for as long as it runs, as the guard counts it."""
    drain.in_flight += 1
    try:
        yield
    finally:
        drain.in_flight -= 1


async def call(batcher: DynamicBatcher, drain: Drain, images: np.ndarray) -> np.ndarray:
    async with admitted(drain):
        return await batcher.submit(images)


def image(value: int, count: int = 1) -> np.ndarray:
    return np.full((count, 32, 32, 3), value, dtype=np.uint8)


def test_concurrent_requests_share_forward_passes():
    forward = StubForward(delay=0.02)
    batcher, drain = wired(forward, max_batch_size=32, max_delay_ms=5)

    async def main():
        return await asyncio.gather(*(call(batcher, drain, image(i % 200)) for i in range(100)))

    results = asyncio.run(main())
    for i, logits in enumerate(results):  # every caller gets its own row back
        assert logits.shape == (1, 10) and logits[0, 0] == i % 200
    assert sorted(forward.computed) == sorted(i % 200 for i in range(100))
    assert max(map(len, forward.batches)) <= 32 and len(forward.batches) <= 8
    assert forward.threads == {next(iter(forward.threads))} and "forward" in next(iter(forward.threads))


# A delay far longer than a stub forward pass takes, even on a loaded machine: waiting it is unmistakable.
LONG_DELAY_MS = 2000


def test_lone_request_does_not_wait_for_company():
    """c = 1: the only admitted call is already queued, so nobody else is coming and the batch runs at once."""
    batcher, drain = wired(StubForward(), max_batch_size=32, max_delay_ms=LONG_DELAY_MS)

    async def main():
        await call(batcher, drain, image(1))  # the worker task and its thread exist from here on
        started = time.perf_counter()
        await call(batcher, drain, image(2))
        return time.perf_counter() - started

    assert asyncio.run(main()) < LONG_DELAY_MS / 1000 / 2


def test_lone_single_image_is_computed_on_the_event_loop_and_company_on_the_forward_thread():
    """With a CPU engine, a lone call's image skips the hand-off to the forward thread; as soon as
    another call is admitted (or the call carries several images) the pass goes to that thread, so
    the loop keeps parsing and decoding while it computes."""
    forward = StubForward(delay=0.01)
    batcher, drain = wired(forward, max_batch_size=32, max_delay_ms=5, inline_lone_calls=True)

    async def main():
        await call(batcher, drain, image(1))
        lone = set(forward.threads)
        forward.threads.clear()
        await asyncio.gather(*(call(batcher, drain, image(i)) for i in range(2, 6)))
        await call(batcher, drain, image(6, count=2))
        return lone, forward.threads

    lone, busy = asyncio.run(main())
    assert lone == {threading.main_thread().name}
    assert busy and all(name.startswith("forward") for name in busy)


def test_batch_waits_for_an_admitted_call_still_on_its_way():
    """Two calls admitted, one queued: the batcher holds the batch for the second (still parsing) and
    runs both in one forward pass; a lone call would not have waited."""
    forward = StubForward()
    batcher, drain = wired(forward, max_batch_size=32, max_delay_ms=LONG_DELAY_MS)

    async def main():
        async def parsing_then_submit():
            async with admitted(drain):
                await asyncio.sleep(0.2)  # parsing and decoding its upload
                return await batcher.submit(image(8))

        return await asyncio.gather(call(batcher, drain, image(7)), parsing_then_submit())

    first, second = asyncio.run(main())
    assert first[0, 0] == 7 and second[0, 0] == 8
    assert forward.batches == [[7, 8]]


def test_large_request_is_split_and_reassembled_in_order():
    forward = StubForward()
    batcher, drain = wired(forward, max_batch_size=8, max_delay_ms=1)
    images = np.concatenate([image(i) for i in range(20)])
    logits = asyncio.run(call(batcher, drain, images))
    assert [row[0] for row in logits] == list(range(20))
    assert [len(batch) for batch in forward.batches] == [8, 8, 4]


def test_failed_forward_fails_only_its_batch_and_the_batcher_recovers():
    forward = StubForward(fail_when=lambda images: (images == 66).any())
    batcher, drain = wired(forward, max_batch_size=4, max_delay_ms=0)

    async def main():
        bad = await asyncio.gather(call(batcher, drain, image(66)), return_exceptions=True)
        good = await asyncio.gather(*(call(batcher, drain, image(i)) for i in range(6)))
        return bad, good

    bad, good = asyncio.run(main())
    # The caller gets the fixed inference failure (500 inference_error at the edge), never the engine's
    # own message; that is kept as the cause, for the log.
    assert isinstance(bad[0], InferenceFailed) and bad[0].message == FORWARD_FAILED
    assert "simulated" not in str(bad[0]) and isinstance(bad[0].__cause__, RuntimeError)
    assert [g[0, 0] for g in good] == list(range(6))


def test_abandoned_request_is_not_computed_and_does_not_break_others():
    """A caller that gives up while its request waits in the queue (deadline, disconnect): its images are
    dropped, never computed, and the callers around it get their own rows."""
    in_pass, release = threading.Event(), threading.Event()

    def held_forward(images: np.ndarray) -> np.ndarray:
        in_pass.set()
        release.wait(10)  # the first pass lasts until the test has queued and abandoned the others
        return forward(images)

    forward = StubForward()
    batcher, drain = wired(forward, max_batch_size=4, max_delay_ms=1)
    batcher.forward = held_forward

    async def main():
        busy = asyncio.ensure_future(call(batcher, drain, image(1)))
        await asyncio.to_thread(in_pass.wait, 10)  # image 1 is in the forward pass: what comes next waits
        abandoned = asyncio.ensure_future(call(batcher, drain, image(3)))
        others = [asyncio.ensure_future(call(batcher, drain, image(i))) for i in (10, 11)]
        while batcher._queued_images < 3:  # all three queued behind the pass
            await asyncio.sleep(0)
        abandoned.cancel()
        await asyncio.sleep(0)
        release.set()
        return await asyncio.gather(busy, *others), abandoned

    results, abandoned = asyncio.run(main())
    assert abandoned.cancelled()
    assert [r[0, 0] for r in results] == [1, 10, 11]
    assert 3 not in forward.computed, forward.batches
    assert sorted(forward.computed) == [1, 10, 11]


@pytest.mark.parametrize("size", [1, 3, 32])
def test_batch_sizes_never_exceed_the_limit(size):
    forward = StubForward(delay=0.01)
    batcher, drain = wired(forward, max_batch_size=size, max_delay_ms=2)

    async def main():
        await asyncio.gather(*(call(batcher, drain, image(1, count=1 + i % 2)) for i in range(40)))

    asyncio.run(main())
    assert max(map(len, forward.batches)) <= size and len(forward.computed) == 60
