"""API keys, rate limits, load shedding, deadlines and graceful drain, on real server processes."""

import concurrent.futures
import hashlib
import hmac
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from .conftest import MODEL_NAME, ROOT, Server, calls_in_flight, error_fields, read_http_response, wait_until

KEYS = ("alpha-key-0123456789", "beta-key-9876543210", "gamma-key-from-file")


def upload(client: httpx.Client, image: bytes, path: str = "/classify/image", **headers) -> httpx.Response:
    return client.post(path, files={"file": ("cat.jpg", image, "image/jpeg")}, headers=headers)


def multipart_upload(image: bytes, port: int, extra_headers: str = "") -> tuple[bytes, bytes]:
    """(request head + first bytes of the body, rest of the body) of a raw /classify/image upload."""
    body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n" + image + b"\r\n--b--\r\n")
    head = (f"POST /classify/image HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra_headers}Content-Length: {len(body)}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n\r\n").encode()
    return head + body[:100], body[100:]


def read_reply(sock: socket.socket) -> str:
    """One whole HTTP/1.1 response from a raw socket, as text."""
    _, head, body = read_http_response(sock)
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert error_fields(response.json(), response.request.url.path)[0] == code


@pytest.fixture(scope="module")
def image(cifar_jpegs) -> bytes:
    return next(iter(cifar_jpegs.values()))


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """Keys from env API_KEYS and from a mounted-Secret-style file; 5 calls/min per key; 2 s deadline."""
    keys_file = tmp_path_factory.mktemp("secret") / "keys"
    keys_file.write_text(f"# one key per line\n{KEYS[2]}\n")
    srv = Server("--api_keys_file", str(keys_file), "--rate_limit_per_minute", "5", "--request_timeout_s", "2",
                 env={"API_KEYS": f"{KEYS[0]}, {KEYS[1]}"})
    yield srv
    srv.stop()


# -- API keys ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/classify/image", "/classify/batch"])
def test_prediction_without_a_key_is_401(keyed_server, image, path):
    response = keyed_server.client.post(path, files={"file" if path.endswith("image") else "files": ("a.jpg", image)})
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer wrong"}, {"X-API-Key": KEYS[0][:-1]},
                                     {"Authorization": KEYS[0]}, {"Authorization": f"Basic {KEYS[0]}"}],
                         ids=["wrong-bearer", "truncated-key", "no-scheme", "basic-scheme"])
def test_wrong_keys_are_401(keyed_server, image, headers):
    assert_error(upload(keyed_server.client, image, **headers), 401, "unauthorized")


def test_v1_and_v2_need_the_key_too(keyed_server):
    v1 = keyed_server.client.post(f"/v1/models/{MODEL_NAME}:predict", json={"instances": []})
    v2 = keyed_server.client.post(f"/v2/models/{MODEL_NAME}/infer", json={"inputs": []})
    assert_error(v1, 401, "unauthorized")
    assert_error(v2, 401, "unauthorized")


def test_right_keys_from_env_and_file_are_accepted(keyed_server, image):
    by_bearer = upload(keyed_server.client, image, Authorization=f"Bearer {KEYS[1]}")
    by_header = upload(keyed_server.client, image, **{"X-API-Key": KEYS[2]})
    assert by_bearer.status_code == 200, by_bearer.text
    assert by_header.status_code == 200, by_header.text
    assert by_bearer.json()["predicted_class"] == by_header.json()["predicted_class"]


def test_probes_metrics_and_docs_stay_open(keyed_server):
    for path in ("/health", "/v2/health/ready", f"/v2/models/{MODEL_NAME}/ready", "/metrics", "/docs"):
        assert keyed_server.client.get(path).status_code == 200, path


def test_keys_never_reach_the_log(keyed_server, image):
    upload(keyed_server.client, image, Authorization=f"Bearer {KEYS[0]}")
    upload(keyed_server.client, image, Authorization="Bearer not-a-key-but-secret-looking")
    log = keyed_server.log()
    assert all(key not in log for key in (*KEYS, "not-a-key-but-secret-looking"))
    assert "API keys: 3 configured" in log


# -- rate limit (per key when keys are on) -------------------------------------------------------
def test_rate_limit_is_per_key(keyed_server, image):
    key = {"X-API-Key": KEYS[0]}
    statuses = [upload(keyed_server.client, image, **key).status_code for _ in range(8)]
    # test_right_keys... and test_keys_never... may have spent up to 2 of KEYS[0]'s 5 tokens.
    assert statuses.count(200) in (3, 4, 5) and set(statuses[statuses.count(200):]) == {429}, statuses
    limited = upload(keyed_server.client, image, **key)
    assert_error(limited, 429, "rate_limited")
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.headers["x-ratelimit-limit"] == "5" and limited.headers["x-ratelimit-remaining"] == "0"
    other_key = upload(keyed_server.client, image, Authorization=f"Bearer {KEYS[2]}")
    assert other_key.status_code == 200 and other_key.headers["x-ratelimit-limit"] == "5"


# -- deadline ------------------------------------------------------------------------------------
def test_slow_upload_gets_504_at_the_deadline(keyed_server, image):
    """A client that trickles its body is cut off with 504 instead of holding the connection forever."""
    first_part, _ = multipart_upload(image, keyed_server.port, f"X-API-Key: {KEYS[1]}\r\n")
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", keyed_server.port), timeout=20) as sock:
        sock.sendall(first_part)  # ... and the rest never comes
        reply = read_reply(sock)
    assert reply.startswith("HTTP/1.1 504"), reply
    assert '"deadline_exceeded"' in reply
    assert 1.9 < time.monotonic() - started < 15
    assert keyed_server.client.get("/health").status_code == 200


# -- rate limit (per address, default 100/min) ---------------------------------------------------
def test_the_101st_call_in_a_minute_is_429(image):
    """Default limit: 100 calls at once per client address, refilled at 100/min (exact bucket maths below)."""
    srv = Server()  # defaults: no keys, 100 requests/minute per client address
    try:
        started = time.monotonic()
        assert upload(srv.client, image).status_code == 200
        # Calls count whatever they carry; bodiless ones (422) spend the bucket fast.
        statuses = [srv.client.post("/classify/image").status_code for _ in range(99)]
        assert statuses == [422] * 99
        more = []
        while len(more) < 50 and (not more or more[-1].status_code != 429):
            more.append(srv.client.post("/classify/image"))
        regained = (time.monotonic() - started) * 100 / 60  # tokens the bucket refilled meanwhile
        allowed_after_100 = sum(r.status_code != 429 for r in more)
        assert more[-1].status_code == 429 and allowed_after_100 <= regained + 1, (regained, allowed_after_100)
        limited = more[-1]
        assert_error(limited, 429, "rate_limited")
        assert limited.headers["x-ratelimit-limit"] == "100" and limited.headers["x-ratelimit-remaining"] == "0"
        assert 1 <= int(limited.headers["retry-after"]) <= 2
        assert srv.client.get("/health").status_code == 200  # probes are not rate-limited
    finally:
        srv.stop()


# -- load shedding ---------------------------------------------------------------------------------
def test_flood_of_a_tiny_queue_sheds_with_503_and_admitted_calls_succeed(image):
    # The same image every call: with the result cache on, every call after the first would be a hit.
    srv = Server("--max_queue_images", "4", "--max_batch_size", "4", "--rate_limit_per_minute", "0", "--cache_ttl_s", "0")
    try:
        files = [("files", (f"{i}.jpg", image, "image/jpeg")) for i in range(4)]

        def call(_):
            with httpx.Client(base_url=srv.url, timeout=60) as client:
                return client.post("/classify/batch", files=files)

        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            responses = list(pool.map(call, range(96)))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(503) > 0 and statuses.count(200) > 0, statuses
        for response in responses:
            if response.status_code == 503:
                assert_error(response, 503, "overloaded")
                assert response.headers["retry-after"] == "1"
            else:
                assert len(response.json()["results"]) == 4
        metrics = srv.client.get("/metrics").text
        assert re.search(r"^predictor_shed_requests_total (\d+)", metrics, re.M).group(1) == str(statuses.count(503))
        assert srv.client.get("/health").status_code == 200
    finally:
        srv.stop()


def test_calls_beyond_the_in_flight_limit_are_refused_before_their_body_is_read(image):
    """Two uploads still sending their bodies fill --max_in_flight 2: a third call is refused at once
    (its body unread), the two held calls still complete, and the next call is admitted again."""
    srv = Server("--max_in_flight", "2", "--rate_limit_per_minute", "0")
    try:
        first_part, rest = multipart_upload(image, srv.port)
        held = [socket.create_connection(("127.0.0.1", srv.port), timeout=30) for _ in range(2)]
        for sock in held:
            sock.sendall(first_part)
        wait_until(lambda: calls_in_flight(srv.url) == 2, 30, "both uploads to be admitted")  # waiting for their bodies
        started = time.monotonic()
        refused = upload(srv.client, image)
        assert time.monotonic() - started < 2
        assert_error(refused, 503, "overloaded")
        assert refused.headers["retry-after"] == "1"
        for sock in held:
            sock.sendall(rest)
            reply = read_reply(sock)
            assert reply.startswith("HTTP/1.1 200"), reply
            assert '"predicted_class"' in reply
            sock.close()
        assert upload(srv.client, image).status_code == 200
        metrics = srv.client.get("/metrics").text
        assert re.search(r"^predictor_shed_requests_total (\d+)", metrics, re.M).group(1) == "1"
        assert 'api_requests_total{code="503",endpoint="classify_image",status="error"} 1.0' in metrics
    finally:
        srv.stop()


# -- graceful drain ------------------------------------------------------------------------------
def batch_upload(image: bytes, port: int, files: int) -> tuple[bytes, bytes]:
    """(request head + first bytes of the body, rest of the body) of a raw /classify/batch upload of `files` images."""
    parts = b"".join(b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"%d.jpg\"\r\n\r\n" % i + image + b"\r\n"
                     for i in range(files))
    body = parts + b"--b--\r\n"
    head = (f"POST /classify/batch HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n\r\n").encode()
    return head + body[:100], body[100:]


def test_sigterm_during_load_completes_every_admitted_request(image):
    """SIGTERM with admitted calls in flight: each of them completes (200); every request that arrives
    meanwhile, on a new connection or on an already-open keep-alive one, gets 503 shutting_down with
    Connection: close (never a connection closed without an answer); readiness is 503; once the
    admitted calls are done the listener closes and the process exits 0.

    Synchronised on what the server shows, not on time: the held uploads fill --max_in_flight, so a
    probe is refused with 503 overloaded exactly when all of them are admitted; the drain log line
    says how many were admitted when the signal came."""
    held_calls, files = 3, 16
    srv = Server("--rate_limit_per_minute", "0", "--drain_timeout_s", "30", "--max_in_flight", str(held_calls))
    try:
        # Two keep-alive connections, each with one answered call, idle when the signal comes.
        keep_alive = [socket.create_connection(("127.0.0.1", srv.port), timeout=30) for _ in range(2)]
        bodiless = f"POST /classify/image HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nContent-Length: 0\r\n\r\n".encode()
        for sock in keep_alive:
            sock.sendall(bodiless)
            assert read_reply(sock).startswith("HTTP/1.1 422"), "a bodiless call is answered and the connection kept"
        # Three batch uploads admitted and still sending their bodies.
        first_part, rest = batch_upload(image, srv.port, files)
        held = [socket.create_connection(("127.0.0.1", srv.port), timeout=60) for _ in range(held_calls)]
        for sock in held:
            sock.sendall(first_part)
        wait_until(lambda: srv.client.post("/classify/image").status_code == 503, 60, "the held uploads are admitted")

        srv.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        admitted = int(wait_until(lambda: re.search(r"draining; readiness is now 503, (\d+) admitted", srv.log()), 30,
                                  "the drain log line").group(1))
        assert admitted == held_calls, srv.log()
        # uvicorn would have closed idle connections within its 0.1 s tick by now; the drain keeps them.
        time.sleep(0.5)
        for sock in keep_alive:
            sock.sendall(bodiless)
            reply = read_reply(sock)
            assert reply.startswith("HTTP/1.1 503"), reply
            assert re.search(r"(?im)^connection: close", reply) and '"shutting_down"' in reply, reply
            assert sock.recv(1) == b"", "the server closes the connection after that answer"
            sock.close()
        with httpx.Client(base_url=srv.url, timeout=30) as fresh:
            late = upload(fresh, image)
            assert_error(late, 503, "shutting_down")
            assert late.headers["connection"] == "close" and late.headers["retry-after"] == "1"
            assert_error(fresh.get("/health"), 503, "shutting_down")  # readiness
        assert "Shutting down" not in srv.log(), "the listener stays open while admitted calls are in flight"

        for sock in held:
            sock.sendall(rest)
        for sock in held:
            reply = read_reply(sock)
            assert reply.startswith("HTTP/1.1 200"), reply
            assert reply.count('"predicted_class"') == files
            sock.close()
        srv.process.wait(40)
        exit_seconds = time.monotonic() - signalled
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/health", timeout=5)
        log = srv.log()
        assert log.index("drain: no admitted request left") < log.index("Shutting down"), log
        assert "drained: 0 admitted request(s) still in flight" in log
        assert srv.process.returncode == 0 and exit_seconds < 30, (srv.process.returncode, exit_seconds)
    finally:
        srv.stop()


# -- key ids: what names a key where others can read it ----------------------------------------------
KEY_ID_SECRET = "7f3c9e1a5b2d8f4c6e0a9b3d7f1c5e2a8b4d6f0c"


def test_key_ids_in_redis_are_keyed_hashes_the_same_on_every_replica(image, tmp_path):
    """With a key-id secret, what Redis holds about a key (its cache entries' names, its jobs' owner, the
    job stream) is HMAC-SHA256(secret, key), which a reader of Redis cannot test guesses against, never
    the plain sha256 prefix; a second replica given the same secret (from a file) finds the first one's job."""
    import redis

    from .redis_server import RedisServer

    store = RedisServer()
    secret_file = tmp_path / "key-id-secret"
    secret_file.write_text(KEY_ID_SECRET + "\n")  # as a mounted Secret holds it
    replicas = []
    try:
        replicas = [Server("--redis_url", store.url, "--rate_limit_per_minute", "0",
                           env={"API_KEYS": KEYS[0], "KEY_ID_SECRET": KEY_ID_SECRET}),  # the variable, or the file
                    Server("--redis_url", store.url, "--rate_limit_per_minute", "0", "--key_id_secret_file", str(secret_file),
                           env={"API_KEYS": KEYS[0]})]
        first, second = replicas
        key = {"X-API-Key": KEYS[0]}
        assert upload(first.client, image, **key).status_code == 200  # a cache entry of this key
        job = first.client.post("/classify/jobs", files=[("files", ("a.jpg", image, "image/jpeg"))], headers=key)
        assert job.status_code == 202, job.text
        job_id = job.json()["job_id"]
        assert second.client.get(f"/classify/jobs/{job_id}", headers=key).status_code == 200  # the same owner id there

        keyed = hmac.new(KEY_ID_SECRET.encode(), KEYS[0].encode(), hashlib.sha256).hexdigest()[:32]
        plain = hashlib.sha256(KEYS[0].encode()).hexdigest()[:16]
        client = redis.Redis.from_url(store.url)
        try:
            names = [name.decode() for name in client.keys("*")]
            held = list(names)
            for name in names:
                kind = client.type(name).decode()
                if kind == "hash":
                    held += [v.decode(errors="replace") for v in client.hgetall(name).values()]
                elif kind == "stream":
                    held += [v.decode(errors="replace") for _, entry in client.xrange(name) for v in entry.values()]
            assert client.hget(f"job:{MODEL_NAME}:{job_id}", "owner").decode() == keyed
        finally:
            client.close()
        assert any(f"key={keyed}" in name for name in names), names  # the cache entry, per key
        assert not [text for text in held if plain in text], "the unsalted sha256 key id is in Redis"
    finally:
        for server in replicas:
            server.stop()
        store.stop()


def test_without_a_key_id_secret_keys_alone_get_a_per_process_one(keyed_server):
    """No Redis, no KEY_ID_SECRET: key ids never leave the process, so it draws its own secret (logged)."""
    assert "API key ids: this process's own secret" in keyed_server.log()


def test_api_key_ids_are_hmacs_under_the_secret():
    from predictor.core.security import ApiKeys

    named = ApiKeys(["k"], KEY_ID_SECRET)
    assert named.key_id("k") == ApiKeys(["k"], KEY_ID_SECRET).key_id("k")  # every replica alike
    assert named.key_id("k") == hmac.new(KEY_ID_SECRET.encode(), b"k", hashlib.sha256).hexdigest()[:32]
    assert ApiKeys(["k"], "another" + KEY_ID_SECRET).key_id("k") != named.key_id("k")
    assert ApiKeys(["k"]).key_id("k") != ApiKeys(["k"]).key_id("k")  # no secret: one of its own per process
    assert named.id_secret_shared and not ApiKeys(["k"]).id_secret_shared
    assert KEY_ID_SECRET not in repr(named)


# -- refused configurations -------------------------------------------------------------------------
@pytest.mark.parametrize("args, env, message", [
    (["--api_keys_file", "/nonexistent/keys"], {}, "cannot read /nonexistent/keys"),
    (["--redis_url", "redis://127.0.0.1:1/0"], {}, "no key-id secret"),
    (["--redis_url", "redis://127.0.0.1:1/0"], {"KEY_ID_SECRET": "short"}, "must be at least 32 characters"),
    (["--key_id_secret_file", "/nonexistent/id"], {}, "cannot read /nonexistent/id"),
], ids=["unreadable-keys-file", "keys-and-redis-without-key-id-secret", "short-key-id-secret", "unreadable-key-id-file"])
def test_unsafe_auth_configurations_refuse_to_start(args, env, message):
    result = subprocess.run([sys.executable, "-m", "predictor", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "API_KEYS": KEYS[0], **env})
    assert result.returncode != 0
    assert message in result.stderr


def test_the_replaced_trust_forwarded_for_refuses_to_start():
    """TRUST_FORWARDED_FOR (a boolean) is gone; left in a pod spec it must not be silently ignored."""
    result = subprocess.run([sys.executable, "-m", "predictor"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TRUST_FORWARDED_FOR": "true"})
    assert result.returncode != 0
    assert "TRUST_FORWARDED_FOR is replaced by TRUSTED_PROXY_HOPS" in result.stderr


# -- the limiter and key check themselves, on a controlled clock -----------------------------------
def test_token_bucket_allows_100_then_refills_at_100_per_minute():
    from predictor.core.security import RateLimiter

    now = [1000.0]
    limiter = RateLimiter(100, clock=lambda: now[0])
    assert all(limiter.check("a").allowed for _ in range(100))
    refused = limiter.check("a")
    assert not refused.allowed and refused.retry_after_s == 1 and refused.reset_s == 60
    assert limiter.check("b").allowed  # callers do not share buckets
    now[0] += 0.6  # 100/min is one token every 0.6 s
    assert limiter.check("a").allowed and not limiter.check("a").allowed
    now[0] += 60
    assert sum(limiter.check("a").allowed for _ in range(150)) == 100


def test_limiter_forgets_the_least_recent_callers_beyond_its_bound():
    from predictor.core.security import RateLimiter

    limiter = RateLimiter(1, max_callers=3, clock=lambda: 0.0)
    for caller in "abcd":
        assert limiter.check(caller).allowed
    assert not limiter.check("d").allowed and len(limiter._buckets) == 3


def test_api_keys_from_string_and_file(tmp_path):
    from predictor.core.security import ApiKeys

    keys_file = tmp_path / "keys"
    keys_file.write_text("# comment\n\n  file-key  \n")
    keys = ApiKeys.load(" one, ,two ", keys_file)
    assert len(keys) == 3 and keys.accepts("two") and keys.accepts("file-key")
    assert not keys.accepts("# comment") and not keys.accepts("") and not keys.accepts(None) and not keys.accepts("tw")
    assert not ApiKeys.load("").enabled


def test_client_address_counts_trusted_hops_from_the_right():
    from predictor.core.security import caller_identity, client_address

    def scope(*forwarded_for: str) -> dict:
        return {"client": ("10.9.9.9", 40000), "headers": [(b"x-forwarded-for", v.encode()) for v in forwarded_for]}

    chain = scope("6.6.6.6, 1.1.1.1", "2.2.2.2, 3.3.3.3")  # two lines: one list, in order
    assert [client_address(chain, hops) for hops in range(5)] == ["10.9.9.9", "3.3.3.3", "2.2.2.2", "1.1.1.1", "6.6.6.6"]
    assert client_address(chain, 9) == "6.6.6.6"  # fewer entries than hops: the left-most
    assert client_address(scope(), 2) == client_address(scope(" , "), 2) == "10.9.9.9"  # none: the peer
    assert caller_identity(chain, None, 1) == "addr:3.3.3.3"
    assert caller_identity(chain, "a-key", 1) == caller_identity(scope(), "a-key", 0)  # with keys, the key counts
