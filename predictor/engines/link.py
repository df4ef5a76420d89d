"""The wire between the front-end processes (`--workers N`) and the one engine process that owns the model
(predictor.engines.engine_server; predictor.engines.remote is the front ends' side).

A Unix stream socket carries 12-byte headers; the pixels and the answers travel through a shared-memory
region (a memfd each front end makes and hands over once, with its first message), so an image crosses
the process boundary as one copy into the region, never pickled. Chosen by measurement (`python
bench/ipc.py`, round trip of an echo, 2-core AMD EPYC): a batch of 32 images took 311 us pickled over a
multiprocessing Pipe, 94 us as raw bytes over a Unix socket, 65 us through shared memory with a header
on the socket (1 image: 219 / 76 / 22 us; 256 images: 1,289 / 520 / 185 us).

The region holds `slots` request slots; a slot is `max_images` images in, then their logits, then (for
:explain) their layer4 feature maps. A slot belongs to one request from the header that names it until
its reply.
"""

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from predictor.cifar import CLASSES, IMAGE_SIZE

# request id, op (requests) or kind (replies), slot, image count
HEADER = struct.Struct("<IHHI")
# Requests. HELLO: slot = 1 for a front end the pod's readiness waits for (0: the engine process's own
# gRPC side), count = the region's `max_images`, slots in the request id; the memfd rides along.
OP_HELLO, OP_LOGITS, OP_REFERENCE = 0, 1, 2
# Replies. STATUS (sent to every front end when one connects or goes): slot = 1 once every expected
# front end has connected (start-up is over), count = front ends connected now.
REPLY_OK, REPLY_FAILED, REPLY_STATUS = 0, 1, 2

NUM_CLASSES = len(CLASSES)
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)
IMAGE_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3
FEATURE_SHAPE = (512, 4, 4)  # layer4 of the CIFAR ResNet18, what Grad-CAM weighs
FEATURE_FLOATS = 512 * 4 * 4
DEFAULT_SLOTS = 4  # the batcher's one pass in flight, two :explain calls, and one to spare


class EngineGone(Exception):
    """The engine process is gone (or never answered): no forward pass can be asked for."""


class ForwardFailed(Exception):
    """The engine process ran the pass and it raised (its log has why)."""


def headers(received: bytearray) -> Iterator[tuple[int, int, int, int]]:
    """The whole headers at the front of `received` (a link's bytes read so far), each taken off it as it
    is yielded: (request id, op or kind, slot, count). A partial header stays for the next read."""
    size = HEADER.size
    while len(received) >= size:
        fields = HEADER.unpack_from(received)
        del received[:size]
        yield fields


def address(token: str) -> str:
    """The engine's socket: an abstract Unix address (no file to clean up; private to the pod's network namespace)."""
    return f"\0cifar10-engine-{token}"


@dataclass(frozen=True)
class Layout:
    """Where a slot's inputs and outputs lie in a front end's region."""

    max_images: int
    slots: int = DEFAULT_SLOTS

    @property
    def slot_bytes(self) -> int:
        return self.max_images * (IMAGE_BYTES + 4 * (NUM_CLASSES + FEATURE_FLOATS))

    @property
    def size(self) -> int:
        return self.slot_bytes * self.slots

    def images(self, region, slot: int, count: int) -> np.ndarray:
        return np.ndarray((count, *IMAGE_SHAPE), np.uint8, region, self.slot_bytes * slot)

    def logits(self, region, slot: int, count: int) -> np.ndarray:
        return np.ndarray((count, NUM_CLASSES), np.float32, region, self.slot_bytes * slot + self.max_images * IMAGE_BYTES)

    def features(self, region, slot: int, count: int) -> np.ndarray:
        offset = self.slot_bytes * slot + self.max_images * (IMAGE_BYTES + 4 * NUM_CLASSES)
        return np.ndarray((count, *FEATURE_SHAPE), np.float32, region, offset)
