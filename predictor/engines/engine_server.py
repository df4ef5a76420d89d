"""The engine process's side of the link (predictor.engines.link): the one place where forward passes run
when `--workers N` front-end processes serve the pod.

One thread owns the engine. It reads the front ends' requests as they come and runs each pass on all of
them that fit in `max_batch_images`, whichever front end sent them: each front end's batcher has
already grouped its own calls, so the engine adds no waiting, and while a pass runs the next one fills
from every front end (continuous batching). :explain's fp32 passes run beside it in their own threads.
A failed pass fails only its requests; a front end that goes loses only its own requests.
"""

import concurrent.futures
import logging
import mmap
import os
import secrets
import selectors
import socket
import struct
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter, Histogram

from predictor.engines import link
from predictor.engines.link import HEADER, Layout

log = logging.getLogger("predictor")

PASS_IMAGES = Histogram("predictor_engine_pass_images", "Images per forward pass of the engine process (--workers N)",
                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
PASSES = Counter("predictor_engine_passes_total", "Forward passes of the engine process, by how many front-end "
                 "processes' requests they held (one|several)", ["front_ends"])
HELLO_TIMEOUT_S = 5.0


@dataclass(eq=False)
class FrontEnd:
    """One connected front-end process: its socket, its shared-memory region, and what it has sent."""

    sock: socket.socket
    region: mmap.mmap
    layout: Layout
    pid: int
    counts_for_readiness: bool
    received: bytearray
    send_lock: threading.Lock
    alive: bool = True

    def reply(self, request_id: int, kind: int, slot: int = 0, count: int = 0) -> None:
        with self.send_lock:
            self.sock.sendall(HEADER.pack(request_id, kind, slot, count))


@dataclass
class Request:
    front_end: FrontEnd
    request_id: int
    slot: int
    count: int


class EngineServer:
    """Serves `engine` (and the fp32 `reference`, for :explain) to front-end processes on `address`.
    `front_ends`: how many the pod's readiness waits for; `max_batch_images`: the largest pass."""

    def __init__(self, engine, reference, front_ends: int, max_batch_images: int, explain_threads: int = 2):
        self.engine = engine
        self.reference = reference
        self.expected = front_ends
        self.max_batch_images = max_batch_images
        self.address = link.address(f"{os.getpid()}-{secrets.token_hex(6)}")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.address)
        self._listener.listen(64)
        self._listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._front_ends: list[FrontEnd] = []
        self._pending: deque[Request] = deque()
        self._started = False  # every expected front end has connected once: the pod may be ready
        self._explain = concurrent.futures.ThreadPoolExecutor(explain_threads, thread_name_prefix="engine-explain")
        self._thread = threading.Thread(target=self._serve, name="engine", daemon=True)
        # Front ends are forked from this process (predictor.serving.kserve_compat): none may fork while
        # this thread holds a lock the child would inherit held (prometheus_client's, around a metric),
        # and each closes its copies of the engine's sockets, or the engine's death would never reach it
        # as a closed link.
        self._fork_guard = threading.Lock()
        os.register_at_fork(before=self._fork_guard.acquire, after_in_parent=self._fork_guard.release,
                            after_in_child=self._close_in_child)

    def start(self) -> None:
        self._thread.start()
        log.info("engine process %d serves %s to %d front-end process(es), up to %d images per pass", os.getpid(),
                 self.engine.description, self.expected, self.max_batch_images)

    def _close_in_child(self) -> None:
        self._fork_guard = threading.Lock()
        for front_end in self._front_ends:
            front_end.sock.close()
            front_end.region.close()
        self._listener.close()
        self._selector.close()

    # -- the loop ------------------------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            # With requests waiting, only collect what has already arrived before the next pass.
            for key, _ in self._selector.select(0 if self._pending else None):
                if key.data is None:
                    self._accept()
                else:
                    self._read(key.data)
            if self._pending:
                self._run_pass()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            sock.settimeout(HELLO_TIMEOUT_S)
            message, fds, _, _ = socket.recv_fds(sock, HEADER.size, 1)
            slots, op, counts, max_images = HEADER.unpack(message)
            if op != link.OP_HELLO or len(fds) != 1:
                raise ValueError("the first message was not a hello with a shared-memory region")
            layout = Layout(max_images, slots)
            region = mmap.mmap(fds[0], layout.size)
            os.close(fds[0])
            pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        except (OSError, ValueError, struct.error) as exc:
            log.warning("engine process: a connection without a valid hello was closed (%s)", exc)
            sock.close()
            return
        sock.setblocking(True)
        front_end = FrontEnd(sock, region, layout, pid, bool(counts), bytearray(), threading.Lock())
        self._front_ends.append(front_end)
        self._selector.register(sock, selectors.EVENT_READ, front_end)
        log.info("engine process: front end %d connected (%d of %d)", pid, self._counted(), self.expected)
        self._announce()

    def _counted(self) -> int:
        return sum(f.counts_for_readiness for f in self._front_ends)

    def _announce(self) -> None:
        """Tell every front end how many are connected, and once all have, that start-up is over."""
        self._started = self._started or self._counted() >= self.expected
        for front_end in list(self._front_ends):
            try:
                front_end.reply(0, link.REPLY_STATUS, int(self._started), self._counted())
            except OSError:
                self._drop(front_end, "gone while told the status")

    def _read(self, front_end: FrontEnd) -> None:
        try:
            data = front_end.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop(front_end, "closed its link")
            return
        front_end.received += data
        for request_id, op, slot, count in link.headers(front_end.received):
            if slot >= front_end.layout.slots or count > front_end.layout.max_images:
                self._drop(front_end, f"sent a request outside its region (slot {slot}, {count} images)")
                return
            request = Request(front_end, request_id, slot, count)
            if op == link.OP_REFERENCE:
                self._explain.submit(self._explain_one, request)
            else:
                self._pending.append(request)

    def _drop(self, front_end: FrontEnd, why: str) -> None:
        if not front_end.alive:
            return
        front_end.alive = False
        self._selector.unregister(front_end.sock)
        front_end.sock.close()
        try:
            front_end.region.close()
        except BufferError:  # an :explain pass of its still holds a view: the mapping goes with that view
            pass
        self._front_ends.remove(front_end)
        lost = sum(1 for r in self._pending if r.front_end is front_end)
        self._pending = deque(r for r in self._pending if r.front_end is not front_end)
        log.warning("engine process: front end %d %s; %d of its request(s) dropped", front_end.pid, why, lost)
        self._announce()

    # -- passes --------------------------------------------------------------------------------------
    def _run_pass(self) -> None:
        batch = [self._pending.popleft()]  # a request larger than a pass is still served, alone
        images = batch[0].count
        while self._pending and images + self._pending[0].count <= self.max_batch_images:
            batch.append(self._pending.popleft())
            images += batch[-1].count
        inputs = [r.front_end.layout.images(r.front_end.region, r.slot, r.count) for r in batch]
        try:
            logits = self.engine.logits(inputs[0] if len(inputs) == 1 else np.concatenate(inputs))
        except Exception as exc:  # a failed pass fails only the requests in it
            log.error("engine process: forward pass of %d images failed", images, exc_info=exc)
            logits = None
        with self._fork_guard:
            PASS_IMAGES.observe(images)
            PASSES.labels("several" if len({id(r.front_end) for r in batch}) > 1 else "one").inc()
        start = 0
        for request in batch:
            front_end = request.front_end
            if logits is not None and front_end.alive:
                front_end.layout.logits(front_end.region, request.slot, request.count)[:] = logits[start:start + request.count]
            start += request.count
            self._answer(request, link.REPLY_OK if logits is not None else link.REPLY_FAILED)

    def _answer(self, request: Request, kind: int) -> None:
        front_end = request.front_end
        if not front_end.alive:
            return
        try:
            front_end.reply(request.request_id, kind, request.slot, request.count)
        except OSError:
            pass  # it is gone: the loop sees its socket close and drops it

    def _explain_one(self, request: Request) -> None:
        front_end, slot, count = request.front_end, request.slot, request.count
        try:
            logits, features = self.reference.run(front_end.layout.images(front_end.region, slot, count))
            front_end.layout.logits(front_end.region, slot, count)[:] = logits
            front_end.layout.features(front_end.region, slot, count)[:] = features
            kind = link.REPLY_OK
        except Exception as exc:
            if front_end.alive:  # else its region was unmapped under it: nobody waits for the answer
                log.error("engine process: an :explain pass of %d images failed", count, exc_info=exc)
            kind = link.REPLY_FAILED
        self._answer(request, kind)
