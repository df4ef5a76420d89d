"""How to carry pixels to the engine process and logits back: the measurement behind predictor.engines.link.

    python bench/ipc.py [--rounds 3000]

A child process echoes zero logits for each batch of uint8 images it receives; the parent times round
trips for batches of 1, 32 and 256 images three ways: pickled numpy arrays over a multiprocessing Pipe
(what multiprocessing offers by default), raw bytes with a length header over a Unix socket, and
shared memory (the images written into a region the child maps, a header on the socket; the logits
written back into the region).
"""

import argparse
import multiprocessing
import socket
import struct
import time
from multiprocessing import shared_memory

import numpy as np

LENGTH = struct.Struct("<Q")
CAPACITY = 256  # images the shared region holds
LOGITS_OFFSET = CAPACITY * 32 * 32 * 3


def receive(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        got += sock.recv_into(view[got:], size - got)
    return buffer


def echo_pickled(conn) -> None:
    while True:
        try:
            images = conn.recv()
        except EOFError:
            return
        conn.send(np.zeros((len(images), 10), np.float32))


def echo_bytes(sock: socket.socket) -> None:
    while header := sock.recv(LENGTH.size):
        images = np.frombuffer(receive(sock, LENGTH.unpack(header)[0]), np.uint8).reshape(-1, 32, 32, 3)
        logits = np.zeros((len(images), 10), np.float32).tobytes()
        sock.sendall(LENGTH.pack(len(logits)) + logits)


def echo_shared(sock: socket.socket, name: str) -> None:
    region = shared_memory.SharedMemory(name)
    while header := sock.recv(LENGTH.size):
        count = LENGTH.unpack(header)[0]
        np.ndarray((count, 32, 32, 3), np.uint8, region.buf).copy()  # the engine stacks its batch from it
        np.ndarray((count, 10), np.float32, region.buf, offset=LOGITS_OFFSET)[:] = 0
        sock.sendall(header)


def time_pickled(images: np.ndarray, rounds: int) -> float:
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.Process(target=echo_pickled, args=(child,))
    process.start()
    started = time.perf_counter()
    for _ in range(rounds):
        parent.send(images)
        parent.recv()
    elapsed = time.perf_counter() - started
    parent.close()
    process.terminate()
    return elapsed


def time_bytes(images: np.ndarray, rounds: int) -> float:
    parent, child = socket.socketpair()
    process = multiprocessing.Process(target=echo_bytes, args=(child,))
    process.start()
    started = time.perf_counter()
    for _ in range(rounds):
        data = images.tobytes()
        parent.sendall(LENGTH.pack(len(data)) + data)
        np.frombuffer(receive(parent, LENGTH.unpack(receive(parent, LENGTH.size))[0]), np.float32)
    elapsed = time.perf_counter() - started
    parent.close()
    process.join(5)
    return elapsed


def time_shared(images: np.ndarray, rounds: int) -> float:
    region = shared_memory.SharedMemory(create=True, size=LOGITS_OFFSET + CAPACITY * 40)
    parent, child = socket.socketpair()
    process = multiprocessing.Process(target=echo_shared, args=(child, region.name))
    process.start()
    pixels = np.ndarray((CAPACITY, 32, 32, 3), np.uint8, region.buf)
    started = time.perf_counter()
    for _ in range(rounds):
        pixels[:len(images)] = images
        parent.sendall(LENGTH.pack(len(images)))
        receive(parent, LENGTH.size)
        np.ndarray((len(images), 10), np.float32, region.buf, offset=LOGITS_OFFSET).copy()
    elapsed = time.perf_counter() - started
    parent.close()
    process.join(5)
    del pixels
    region.close()
    region.unlink()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3000)
    args = parser.parse_args()
    print("| batch | pickled over a Pipe | raw bytes over a socket | shared memory + header |\n|---|---|---|---|")
    for batch in (1, 32, 256):
        images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), np.uint8)
        cells = [f"{1e6 * way(images, args.rounds) / args.rounds:.0f} us" for way in (time_pickled, time_bytes, time_shared)]
        print(f"| {batch} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
