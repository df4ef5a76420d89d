"""The engine as a front-end process sees it (`--workers N`): an `Engine` (predictor.dataplane) whose
forward passes run in the engine process (predictor.engines.engine_server), asked for over the link
(predictor.engines.link) from this process's event loop, with no thread hop: the pixels are copied into
a shared-memory slot, a header is written, and the reply resolves a future when the loop reads it.

The engine's death is seen at once, idle or not (the socket closes): every call waiting gets
`EngineGone`, `available()` turns false (readiness then answers 503), and `on_lost` runs.
"""

import asyncio
import itertools
import logging
import mmap
import os
import socket
from collections.abc import Callable

import numpy as np

from predictor.engines import link
from predictor.engines.link import HEADER, EngineGone, ForwardFailed, Layout

log = logging.getLogger("predictor")


class RemoteEngine:
    """An engine in another process. Made in the engine process from the engine it serves (`describing`),
    then pickled into each front end, which connects from its serving loop (`connect`)."""

    def __init__(self, address: str, layout: Layout, described: dict, fc_weight: np.ndarray):
        self.address = address
        self.layout = layout
        self.described = described
        self.fc_weight = fc_weight  # [10, 512]: the fp32 network's class weights, which Grad-CAM weighs
        self.name, self.precision, self.compiled = described["name"], described["precision"], described["compiled"]
        self.startup_seconds, self.device_type = described["startup_seconds"], described["device_type"]
        self.description = described["description"] + " in the engine process"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._socket: socket.socket | None = None
        self._region: mmap.mmap | None = None
        self._free_slots: asyncio.Queue | None = None
        self._waiting: dict[int, tuple[asyncio.Future, int, int, int]] = {}  # id -> (future, op, slot, count)
        self._ids = itertools.count(1)
        self._received = bytearray()
        self._connecting: asyncio.Task | None = None
        self._on_lost: Callable[[], None] | None = None
        self.lost = False
        self.front_end = False  # a front end the pod's readiness waits for (connect), not the engine process's own gRPC side
        self.started = False  # every expected front end has connected once

    @classmethod
    def describing(cls, engine, address: str, layout: Layout, fc_weight: np.ndarray) -> "RemoteEngine":
        return cls(address, layout, {"name": engine.name, "precision": engine.precision, "compiled": engine.compiled,
                                     "startup_seconds": engine.startup_seconds, "device_type": engine.device_type,
                                     "description": engine.description, "threads": engine.intra_op_threads()},
                   np.asarray(fc_weight, np.float32))

    def unconnected(self) -> "RemoteEngine":
        """A new client of the same engine, for a process forked from this one's."""
        return RemoteEngine(**self.__getstate__())

    def __getstate__(self) -> dict:
        # What a front end needs to connect; its socket, region and futures are made there.
        return {"address": self.address, "layout": self.layout, "described": self.described, "fc_weight": self.fc_weight}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def intra_op_threads(self) -> int:
        return self.described["threads"]

    def available(self) -> bool:
        """The engine not lost and, for a front end the pod's readiness waits for, start-up over (every
        such front end connected once; the engine says so once its link is open). The engine process's
        own client (its gRPC side) connects on first use."""
        return not self.lost and (self.started or not self.front_end)

    # -- connection ---------------------------------------------------------------------------------
    async def connect(self, on_lost: Callable[[], None] | None = None) -> None:
        """Connect a front end from its serving loop: hand the engine this process's shared-memory region.
        `on_lost` runs once if the engine goes."""
        self._on_lost, self.front_end = on_lost, True
        await self._connected()

    async def _connected(self) -> None:
        if self._socket is not None or self.lost:
            return
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._open())
        await asyncio.shield(self._connecting)

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        memfd = os.memfd_create("cifar10-engine-link", os.MFD_CLOEXEC)
        try:
            os.ftruncate(memfd, self.layout.size)
            region = mmap.mmap(memfd, self.layout.size)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, self.address)
            except OSError as exc:
                sock.close()
                self._lose(f"cannot reach the engine process ({exc})")
                raise EngineGone("the engine process is not reachable") from exc
            hello = HEADER.pack(self.layout.slots, link.OP_HELLO, int(self.front_end), self.layout.max_images)
            socket.send_fds(sock, [hello], [memfd])  # 12 bytes on a fresh connection: never blocks
        finally:
            os.close(memfd)  # the region stays mapped here, and the engine holds its own descriptor
        self._loop, self._socket, self._region = loop, sock, region
        self._free_slots = asyncio.Queue()
        for slot in range(self.layout.slots):
            self._free_slots.put_nowait(slot)
        loop.add_reader(sock.fileno(), self._on_readable)

    # -- calls ---------------------------------------------------------------------------------------
    async def logits_async(self, images: np.ndarray) -> np.ndarray:
        """[N, 32, 32, 3] uint8 -> [N, 10] float32 logits, computed in the engine process."""
        step = self.layout.max_images
        return np.concatenate([await self._call(link.OP_LOGITS, images[i:i + step])
                               for i in range(0, len(images), step)])

    async def reference_async(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The fp32 network's logits and layer4 maps (what :explain needs), computed in the engine process."""
        step = self.layout.max_images
        parts = [await self._call(link.OP_REFERENCE, images[i:i + step]) for i in range(0, len(images), step)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Blocking form, for a thread other than the serving loop's."""
        return self._blocking(self.logits_async(images))

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Blocking `reference_async`, for :explain's threads (the interface of predictor.engines.reference)."""
        return self._blocking(self.reference_async(images))

    def _blocking(self, coroutine):
        if self._loop is None or self._loop.is_closed():
            coroutine.close()
            raise EngineGone("the link to the engine process is not open in this process")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _call(self, op: int, images: np.ndarray):
        await self._connected()
        if self.lost:
            raise EngineGone("the engine process is gone")
        slot = await self._free_slots.get()
        count = len(images)
        self.layout.images(self._region, slot, count)[:] = images
        request_id = next(self._ids) & 0xFFFFFFFF
        future = self._loop.create_future()
        self._waiting[request_id] = (future, op, slot, count)
        try:
            self._socket.send(HEADER.pack(request_id, op, slot, count))  # 12 bytes: a socket buffer always takes them
        except OSError as exc:
            self._lose(f"writing to the engine process failed ({exc})")
        # The slot goes back when the reply is read (_answer), even if this caller has gone by then: the
        # engine may still write into it.
        return await future

    # -- replies -------------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            data = self._socket.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lose(f"reading from the engine process failed ({exc})")
            return
        if not data:
            self._lose("the engine process closed the link")
            return
        self._received += data
        for request_id, kind, slot, count in link.headers(self._received):
            if kind == link.REPLY_STATUS:
                if slot and not self.started:
                    log.info("engine process: all %d front end(s) connected", count)
                self.started = self.started or bool(slot)
            else:
                self._answer(request_id, kind)

    def _answer(self, request_id: int, kind: int) -> None:
        future, op, slot, count = self._waiting.pop(request_id)
        if not future.done():
            if kind == link.REPLY_OK:
                logits = self.layout.logits(self._region, slot, count).copy()
                future.set_result(logits if op == link.OP_LOGITS else
                                  (logits, self.layout.features(self._region, slot, count).copy()))
            else:
                future.set_exception(ForwardFailed("the forward pass failed in the engine process"))
        self._free_slots.put_nowait(slot)

    def _lose(self, why: str) -> None:
        if self.lost:
            return
        self.lost = True
        log.error("engine process lost: %s; %d call(s) waiting on it get 503, readiness is now 503", why, len(self._waiting))
        if self._socket is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._socket.fileno())
            self._socket.close()
        for future, *_ in self._waiting.values():
            if not future.done():
                future.set_exception(EngineGone("the engine process is gone"))
        self._waiting.clear()
        if self._on_lost is not None:
            self._on_lost()


class RemoteReference:
    """The fp32 reference network (predictor.engines.reference's interface: `run`, `fc_weight`) served
    by the engine process: what :explain reads in a front end, which holds no weights."""

    def __init__(self, engine: RemoteEngine):
        self.engine = engine
        self.fc_weight = engine.fc_weight

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.engine.run(images)

    def logits(self, images: np.ndarray) -> np.ndarray:
        return self.engine.run(images)[0]
