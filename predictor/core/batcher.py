"""Dynamic batching: requests that arrive together share one forward pass.

Callers `await submit(images)`; one worker task drains the queue into batches of at most
`max_batch_size` images, waiting at most `max_delay` for company once the first request is in, and
runs each batch in a single dedicated thread so the event loop is free meanwhile. While a batch runs,
the next one fills up, so under load batches grow on their own and a lone request is not held back.
With an engine in another process (`--workers N`: `forward_async`, predictor.engines.remote) each
batch is awaited on the loop instead, and the next one is sent while it computes (at most
REMOTE_PASSES_IN_FLIGHT), so the engine process can join batches of several front ends.
A lone call's single image is computed on the event loop itself when the engine allows
(`inline_lone_calls`): with no one else admitted, there is nothing for the loop to do meanwhile, and
the hand-off to the forward thread and back was a third of the server's own time per call.

Two lanes: interactive calls, and background work (async batch jobs, `submit(..., background=True)`).
A batch takes every interactive request that fits first and fills only the space left with
background images, and never waits for company on their account, so a job adds at most one forward
pass to an interactive call's wait, however large the job; while interactive calls are in flight,
job work runs in quarter batches, so that pass is short. Background work is bounded by its
callers (a job worker submits one chunk at a time), not by `max_queue_images`.
"""

import asyncio
import concurrent.futures
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from predictor.core import metrics
from predictor.core.errors import InferenceFailed, Overloaded, Unavailable
from predictor.engines.link import EngineGone

log = logging.getLogger("predictor")
# What a caller of a failed forward pass is told (500 inference_error; gRPC INTERNAL): the exception
# itself (a CUDA or ONNX Runtime message, paths, shapes) goes to the log, not to the client.
FORWARD_FAILED = "The forward pass failed; retrying may succeed."
# Passes one front end may have in the engine process at once (each takes a slot of its shared memory).
REMOTE_PASSES_IN_FLIGHT = 2
ENGINE_GONE = "The engine process is gone; this replica is restarting."


@dataclass
class _Pending:
    images: np.ndarray
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class DynamicBatcher:
    """Stacks concurrent requests into batches for `forward` ([N,32,32,3] uint8 -> [N,10])."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], max_batch_size: int, max_delay_ms: float,
                 max_queue_images: int = 256, in_flight: Callable[[], int] | None = None,
                 inline_lone_calls: bool = False,
                 forward_async: Callable[[np.ndarray], Awaitable[np.ndarray]] | None = None):
        self.forward = forward
        # An engine in another process is awaited on the loop itself (predictor.engines.remote): no thread.
        self.forward_async = forward_async
        self.inline_lone_calls = inline_lone_calls  # the engine is thread-safe and frees the GIL (CPU engines)
        self.in_flight = in_flight  # calls admitted upstream (None: unknown, so always wait the delay)
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1000.0
        self.max_queue_images = max_queue_images
        self._piece = max(1, max_batch_size // 4)  # background work's unit
        self._pending: deque[_Pending] = deque()
        self._background: deque[_Pending] = deque()
        self._queued_images = 0  # interactive images waiting (the bound applies to them only)
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._remote_passes = asyncio.Semaphore(REMOTE_PASSES_IN_FLIGHT)
        self._passes_running: set[asyncio.Task] = set()

    async def submit(self, images: np.ndarray, background: bool = False) -> np.ndarray:
        """Logits for `images`, computed in as few forward passes as the traffic allows.

        Raises a 503 ApiError at once when the interactive queue cannot take them: a full queue
        means the replica is saturated, and waiting longer would only grow everyone's latency.
        `background` work goes in the low-priority lane and is never refused.
        """
        self._ensure_worker()
        # An empty queue takes any request, so one larger than the queue bound is still served.
        if (not background and self._queued_images + len(images) > self.max_queue_images
                and self._queued_images > 0):
            metrics.SHED.inc()
            raise Overloaded(f"{self._queued_images} images are already queued (limit {self.max_queue_images})")
        # Background work comes in quarter batches, so it can fill what interactive requests leave of a batch.
        piece = self._piece if background else self.max_batch_size
        chunks = [_Pending(images[i:i + piece]) for i in range(0, len(images), piece)]
        for chunk in chunks:
            if background:
                self._background.append(chunk)
            else:
                self._pending.append(chunk)
                self._queued_images += len(chunk.images)
            metrics.QUEUE_DEPTH.inc(len(chunk.images))
        self._arrived.set()
        try:
            return np.concatenate([await chunk.future for chunk in chunks])
        except asyncio.CancelledError:  # the caller gave up: none of its chunks need computing
            for chunk in chunks:
                chunk.future.cancel()
            raise

    def _ensure_worker(self) -> None:
        # Created on first use so they belong to the serving event loop (and to each worker process).
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="dynamic-batcher")

    async def _wait_for_arrival(self, timeout: float | None) -> bool:
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def _next_batch(self) -> list[_Pending]:
        while not self._pending and not self._background:
            await self._wait_for_arrival(None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_delay
        while self._pending and self._queued_images < self.max_batch_size and self._others_coming():
            remaining = deadline - loop.time()
            if remaining <= 0 or not await self._wait_for_arrival(remaining):
                break
        batch: list[_Pending] = []
        interactive = self._take(self._pending, batch, 0, self.max_batch_size)
        self._queued_images -= interactive
        # While interactive calls are on their way, job work goes in quarter batches: the pass an
        # arriving call must wait for is then a quarter as long.
        size = sum(len(p.images) for p in batch)
        busy = self.in_flight is not None and self.in_flight() > 0
        self._take(self._background, batch, size, min(size + self._piece, self.max_batch_size) if busy else self.max_batch_size)
        return batch

    def _take(self, lane: deque[_Pending], batch: list[_Pending], size: int, limit: int) -> int:
        """Move whole requests from `lane` into `batch` while it stays within `limit` images; returns
        the images taken off the lane.

        A chunk that does not fit starts the next batch. Chunks whose caller has gone (deadline
        passed, client disconnected) are dropped rather than computed.
        """
        taken = 0
        while lane and size + len(lane[0].images) <= limit:
            pending = lane.popleft()
            taken += len(pending.images)
            if pending.future.done():
                continue
            batch.append(pending)
            size += len(pending.images)
        metrics.QUEUE_DEPTH.dec(taken)
        return taken

    def _others_coming(self) -> bool:
        """Whether admitted calls are still on their way here (parsing, decoding): only then is the
        delay worth waiting. A lone call (c=1) is run at once instead of waiting for company."""
        return self.in_flight is None or self.in_flight() > len(self._pending)

    def _alone(self, images: np.ndarray) -> bool:
        """One image, and no other call admitted or queued: computing it on the loop delays no one."""
        return (self.inline_lone_calls and len(images) == 1 and self.in_flight is not None and self.in_flight() <= 1
                and not self._pending and not self._background)

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            images = batch[0].images if len(batch) == 1 else np.concatenate([p.images for p in batch])
            metrics.BATCH_SIZE.observe(len(images))
            if self.forward_async is None:
                await self._pass(batch, images)
                continue
            # An engine in another process: the next batch is sent while this one computes, so the engine
            # process holds several front ends' batches at once and joins them.
            await self._remote_passes.acquire()
            task = asyncio.get_running_loop().create_task(self._pass(batch, images))
            self._passes_running.add(task)
            task.add_done_callback(self._pass_done)

    def _pass_done(self, task: asyncio.Task) -> None:
        self._passes_running.discard(task)
        self._remote_passes.release()

    async def _pass(self, batch: list[_Pending], images: np.ndarray) -> None:
        """One forward pass of `batch`, its logits (or its failure) handed to each of its callers."""
        try:
            if self.forward_async is not None:
                logits = await self.forward_async(images)
            elif self._alone(images):
                logits = self.forward(images)
            else:
                logits = await asyncio.get_running_loop().run_in_executor(self._thread, self.forward, images)
        except EngineGone as exc:  # logged where it was seen (predictor.engines.remote)
            self._fail(batch, Unavailable("engine_unavailable", ENGINE_GONE, {"Retry-After": "1"}), exc)
            return
        except Exception as exc:  # a failed pass fails only the requests in it
            metrics.FORWARD_FAILURES.inc()
            log.error("forward pass of %d images failed", len(images), exc_info=exc)
            self._fail(batch, InferenceFailed("inference_error", FORWARD_FAILED), exc)
            return
        start = 0
        for pending in batch:
            end = start + len(pending.images)
            if not pending.future.done():  # the caller may have gone away
                pending.future.set_result(logits[start:end])
            start = end

    @staticmethod
    def _fail(batch: list[_Pending], failure: Exception, cause: Exception) -> None:
        failure.__cause__ = cause
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(failure)

    def __getstate__(self) -> dict:
        # Only the settings travel to worker processes; queue, task and thread are made there.
        return {"forward": self.forward, "max_batch_size": self.max_batch_size, "max_delay_ms": self.max_delay * 1000,
                "max_queue_images": self.max_queue_images, "in_flight": self.in_flight,
                "inline_lone_calls": self.inline_lone_calls, "forward_async": self.forward_async}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)
