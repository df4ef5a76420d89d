"""Connection limits on a real server process (hardening point 3): an idle connection is closed after
the keep-alive timeout even before its first request, a request head has a deadline and a size limit,
and the open connections of a process are bounded (the longest idle one gives way, else the newcomer
gets 503). Timeouts and bounds are set small by flags here."""

import os
import socket
import time
from pathlib import Path

import pytest

from .conftest import Server, calls_in_flight, read_http_response, wait_until

pytestmark = pytest.mark.slow

GET = b"GET /v2/health/live HTTP/1.1\r\nHost: predictor\r\n\r\n"


def connect(server: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """True if the server closes the connection (EOF or reset) within `within` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def served(sock: socket.socket) -> int:
    sock.sendall(GET)
    return read_http_response(sock)[0]


def open_fds(server: Server) -> int:
    return len(os.listdir(f"/proc/{server.process.pid}/fd"))


@pytest.fixture(scope="module")
def limited():
    """Idle 2 s (KServe's own flag), a head within 1 s and 4 kB, room for 3 connections."""
    srv = Server("--timeout-keep-alive", "2", "--header_timeout_s", "1", "--max_header_bytes", "4096",
                 "--max_connections", "3", "--rate_limit_per_minute", "0")
    srv.client.close()  # its pooled connection would take one of the 3
    yield srv
    srv.stop()


def test_a_connection_that_never_sends_is_closed_after_the_idle_timeout(limited):
    sock = connect(limited)
    try:
        started = time.monotonic()
        assert closed_by_server(sock, within=8), "a silent connection was still open 8 s after a 2 s idle timeout"
        assert time.monotonic() - started >= 1.5  # the idle timeout, not the head deadline (1 s)
    finally:
        sock.close()


def test_a_trickled_head_gets_408_at_its_deadline(limited):
    sock = connect(limited)
    try:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
        started = time.monotonic()
        status = None
        for i in range(40):  # a header line every 0.25 s: each byte would restart a keep-alive timer
            try:
                sock.sendall(f"X-Slow-{i}: 1\r\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(0.25)
            try:
                status, _, body = read_http_response(sock)
                break
            except TimeoutError:
                continue
        assert status == 408, "a head trickled for 10 s was never cut off"
        assert b"request_timeout" in body
        assert 0.9 <= time.monotonic() - started < 5
        assert closed_by_server(sock, within=2)
    finally:
        sock.close()


def test_a_head_over_the_size_limit_gets_431_or_414_and_a_normal_one_is_served(limited):
    whole = b"GET /v2/health/live HTTP/1.1\r\nHost: p\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n"
    endless = [b"GET /v2/health/live HTTP/1.1\r\nX-Big: "] + [b"a" * 1500] * 8  # one header that never ends
    for pieces in ([whole], endless):
        sock = connect(limited)
        try:
            for piece in pieces:
                sock.sendall(piece)
                time.sleep(0.05)
            status, _, body = read_http_response(sock)
            assert status == 431 and b"headers_too_large" in body
            assert closed_by_server(sock, within=3)
        finally:
            sock.close()
    sock = connect(limited)
    try:  # a request target alone over the limit is a 414
        sock.sendall(b"GET /classify/image?" + b"a=1&" * 20_000 + b" HTTP/1.1\r\nHost: p\r\n\r\n")
        status, _, body = read_http_response(sock)
        assert status == 414 and b"uri_too_long" in body
    finally:
        sock.close()
    sock = connect(limited)
    try:
        assert served(sock) == 200
    finally:
        sock.close()


def test_open_connections_are_bounded_idle_ones_give_way_then_newcomers_get_503(limited):
    def settled() -> bool:  # every earlier test's connection is gone: a fresh one is served
        with connect(limited) as probe:
            return served(probe) == 200

    wait_until(settled, 10, "the server to serve a fresh connection")
    baseline = open_fds(limited)
    idle = [connect(limited) for _ in range(3)]
    try:
        for sock in idle:
            assert served(sock) == 200  # each accepted, now idle
        time.sleep(0.1)
        newcomer = connect(limited)  # a 4th: the longest idle (the first) is closed for it
        assert served(newcomer) == 200
        assert closed_by_server(idle[0], within=1)  # at once, not at the 2 s idle timeout
        idle[0].close()
        idle[0] = newcomer

        busy = []
        for sock in idle:  # all 3 now in the middle of a head: none may give way
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
            busy.append(sock)
        refused = connect(limited)
        refused.sendall(GET)
        status, head, body = read_http_response(refused)
        assert status == 503 and b"too_many_connections" in body
        assert b"retry-after: 1" in head.lower() and b"connection: close" in head.lower()
        assert closed_by_server(refused, within=3)
        refused.close()

        # A flood of 30 silent connections never holds more than the bound's descriptors.
        flood = [connect(limited) for _ in range(30)]
        try:
            wait_until(lambda: open_fds(limited) <= baseline + 3 + 1, 5,
                       f"the server's descriptors back to baseline {baseline} + 3")
        finally:
            for sock in flood:
                sock.close()
    finally:
        for sock in idle:
            sock.close()


# -- refusals answered from the head (the front door) ---------------------------------------------
KEY = "door-key-0123456789abcdef"
IMAGE = (Path(__file__).parent / "images" / "airplane_0000.jpg").read_bytes()


def multipart(key: str | None, expect_continue: bool = False) -> tuple[bytes, bytes]:
    """(head, body) of a /classify/image upload, with the key or without it."""
    body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n" + IMAGE + b"\r\n--b--\r\n")
    head = (b"POST /classify/image HTTP/1.1\r\nHost: predictor\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            + (f"X-API-Key: {key}\r\n".encode() if key else b"") + (b"Expect: 100-continue\r\n" if expect_continue else b"")
            + f"Content-Length: {len(body)}\r\n\r\n".encode())
    return head, body


@pytest.fixture(scope="module")
def keyed():
    srv = Server("--rate_limit_per_minute", "0", env={"API_KEYS": KEY})
    yield srv
    srv.stop()


def test_a_refusal_from_the_head_leaves_the_connection_in_step(keyed):
    """Refused before its body arrives, the call's body is still read and dropped: the next requests on
    the same keep-alive connection, refused or served, are answered in order."""
    sock = connect(keyed)
    try:
        for key, status in ((None, 401), (KEY, 200), (None, 401), ("wrong", 401), (KEY, 200)):
            head, body = multipart(key)
            sock.sendall(head)
            if status == 401:  # answered from the head alone, before the body is sent
                answer_status, answer_head, answer = read_http_response(sock)
                assert b"www-authenticate: Bearer" in answer_head
                sock.sendall(body)
            else:
                sock.sendall(body)
                answer_status, _, answer = read_http_response(sock)
            assert answer_status == status, answer
        # Pipelined: a refused call and a served one written together, answered in order.
        refused, served_call = multipart(None), multipart(KEY)
        sock.sendall(b"".join([*refused, *served_call]))
        assert [read_http_response(sock)[0] for _ in range(2)] == [401, 200]
        # Admitted at the door, refused after it by the declared size: its place in flight is given back.
        sock.sendall(b"POST /classify/image HTTP/1.1\r\nHost: predictor\r\nX-API-Key: " + KEY.encode()
                     + b"\r\nContent-Type: image/jpeg\r\nContent-Length: 999999999\r\n\r\n")
        assert read_http_response(sock)[0] == 413
    finally:
        sock.close()
    # Every call admitted at the door was counted in flight once and released once.
    assert wait_until(lambda: calls_in_flight(keyed.url) == 0, 10, "no call left in flight") is True


def test_a_refused_call_that_awaits_100_continue_is_closed(keyed):
    """A client waiting for `100 Continue` before sending its body gets the refusal and a closed
    connection, never a connection expecting a body that will not come."""
    sock = connect(keyed)
    try:
        sock.sendall(multipart(None, expect_continue=True)[0])
        status, head, _ = read_http_response(sock)
        assert status == 401 and b"connection: close" in head.lower()
        assert closed_by_server(sock, 5)
    finally:
        sock.close()
