"""The result cache on real replicas sharing a real redis-server: hits across replicas, keys that keep
answers apart (top_k, other weights), and Redis going away mid-run (classify keeps answering, jobs say why)."""


import pytest

from .conftest import Server, multipart, wait_for_job, wait_until
from .redis_server import RedisServer, redis_server  # noqa: F401  (a fixture)


def classify(server: Server, data: bytes, **params):
    response = server.client.post("/classify/image", files={"file": data}, params=params)
    assert response.status_code == 200, response.text
    return response.headers["x-cache"], {k: v for k, v in response.json().items() if k != "timestamp"}


@pytest.fixture(scope="module")
def shared_redis():
    redis = RedisServer()
    yield redis
    redis.stop()


@pytest.fixture(scope="module")
def pair(shared_redis):
    servers = [Server("--redis_url", shared_redis.url, "--rate_limit_per_minute", "0") for _ in range(2)]
    yield servers
    for server in servers:
        server.stop()


def test_the_same_image_again_is_a_hit_also_on_another_replica(pair, holdout):
    first, second = pair
    data = holdout[10][0]
    state, answer = classify(first, data)
    assert state == "miss"
    assert classify(first, data) == ("hit", answer)
    assert classify(second, data) == ("hit", answer)  # from Redis: the second replica never classified it
    top3_state, top3 = classify(second, data, top_k=3)
    assert top3_state == "miss" and len(top3["top_k"]) == 3  # top_k is part of the key
    other_state, other = classify(second, holdout[11][0])
    assert other_state == "miss" and other != answer


def test_a_batch_is_a_hit_only_when_every_file_is(pair, holdout):
    first, second = pair
    files = [holdout[20][0], holdout[21][0]]
    cold = first.client.post("/classify/batch", files=multipart(files))
    assert cold.headers["x-cache"] == "miss"
    warm = second.client.post("/classify/batch", files=multipart(files))
    assert warm.headers["x-cache"] == "hit" and warm.json()["results"] == cold.json()["results"]
    mixed = second.client.post("/classify/batch", files=multipart(files + [holdout[22][0]]))
    assert mixed.headers["x-cache"] == "miss" and mixed.json()["results"][:2] == cold.json()["results"]
    bad = second.client.post("/classify/batch", files=multipart([b"", b""]))
    assert bad.headers["x-cache"] == "miss" and bad.json()["results"][0]["error"]["code"] == "empty_file"


def test_a_canary_with_other_weights_never_reads_the_stable_entries(pair, shared_redis, holdout):
    first, _ = pair
    data = holdout[30][0]
    _, stable = classify(first, data)
    canary = Server("--redis_url", shared_redis.url, "--random_weights", "--rate_limit_per_minute", "0")
    try:
        state, answer = classify(canary, data)
        assert state == "miss" and answer["model_version"] != stable["model_version"]
        assert answer["all_probabilities"] != stable["all_probabilities"]
        assert classify(canary, data) == ("hit", answer)
    finally:
        canary.stop()


def test_redis_stopping_mid_run_never_fails_a_classify_call(redis_server, holdout):
    server = Server("--redis_url", redis_server.url, "--rate_limit_per_minute", "0")
    try:
        seen = holdout[40][0]
        assert classify(server, seen)[0] == "miss"
        redis_server.stop()
        for data in (seen, seen, holdout[41][0], holdout[42][0]):
            state, answer = classify(server, data)
            assert answer["predicted_class"]
        assert classify(server, seen)[0] == "hit"  # the in-process cache still answers
        refused = server.client.post("/classify/jobs", files=multipart([seen]))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "job_store_unavailable", refused.text
        assert "Redis" in refused.json()["error"]["message"]
        assert str(redis_server.port) not in refused.text and "Connection refused" not in refused.text  # no internals
        wait_until(lambda: "result cache: Redis unavailable" in server.log(), 10, "the outage to be logged")
        assert server.log().count("result cache: Redis unavailable") == 1  # once per outage, not once per call
        metrics = server.client.get("/metrics").text
        assert 'predictor_cache_redis_failures_total' in metrics
        redis_server.start()  # back again: jobs are accepted and run
        accepted = wait_until(lambda: (r := server.client.post("/classify/jobs", files=multipart([seen]))).status_code == 202
                              and r, 30, "a job to be accepted again", interval=0.5)
        assert wait_for_job(server, accepted.json()["job_id"], ("succeeded",))["progress"]["done"] == 1
    finally:
        server.stop()


def test_without_redis_jobs_and_the_cache_live_in_the_process(holdout):
    server = Server("--rate_limit_per_minute", "0")
    try:
        assert "no --redis_url" in server.log()
        data = holdout[50][0]
        assert classify(server, data)[0] == "miss" and classify(server, data)[0] == "hit"
        job = server.client.post("/classify/jobs", files=multipart([data, b""]))
        assert job.status_code == 202, job.text
        done = wait_for_job(server, job.json()["job_id"], ("succeeded",))
        assert done["results"][1]["error"]["code"] == "empty_file"
    finally:
        server.stop()


def test_with_api_keys_the_cache_is_per_key_unless_shared(shared_redis, holdout):
    """Key b must not learn that key a classified these exact bytes (X-Cache: hit, or the speed of
    one); --cache_shared_across_keys true shares the entries instead."""
    keys = {"Authorization": "Bearer cache-key-a"}, {"Authorization": "Bearer cache-key-b"}
    env = {"API_KEYS": "cache-key-a,cache-key-b", "KEY_ID_SECRET": "cache-test-key-id-secret-0123456789abcdef"}

    def state(server: Server, data: bytes, headers: dict) -> str:
        response = server.client.post("/classify/image", files={"file": data}, headers=headers)
        assert response.status_code == 200, response.text
        return response.headers["x-cache"]

    scoped = Server("--redis_url", shared_redis.url, "--rate_limit_per_minute", "0", env=env)
    try:
        data = holdout[60][0]
        assert [state(scoped, data, keys[0]), state(scoped, data, keys[0]), state(scoped, data, keys[1])] == [
            "miss", "hit", "miss"]
        assert state(scoped, data, keys[1]) == "hit"
        batch = scoped.client.post("/classify/batch", files=multipart([holdout[61][0]]), headers=keys[0])
        assert batch.headers["x-cache"] == "miss"
        assert scoped.client.post("/classify/batch", files=multipart([holdout[61][0]]),
                                  headers=keys[1]).headers["x-cache"] == "miss"
    finally:
        scoped.stop()
    shared = Server("--redis_url", shared_redis.url, "--rate_limit_per_minute", "0", "--cache_shared_across_keys",
                    "true", env=env)
    try:
        data = holdout[62][0]
        assert [state(shared, data, keys[0]), state(shared, data, keys[1])] == ["miss", "hit"]
    finally:
        shared.stop()


def test_errors_name_no_internals_and_no_redirect_follows_the_host(pair):
    """A superscript digit as target_class is a 400 (str.isdigit accepts it, int() does not); a corrupt
    image's message names no Python object; a trailing slash is not redirected to the client's Host."""
    server, _ = pair
    explain = server.client.post("/v1/models/cifar10-resnet18:explain", params={"target_class": "\u00b2"},
                                 json={"instances": [[[[0, 0, 0]] * 32] * 32]})
    assert explain.status_code == 400 and explain.json()["error"]["code"] == "invalid_target_class", explain.text
    corrupt = server.client.post("/classify/image", files={"file": b"\x89PNG\r\n\x1a\n" + b"x" * 64})
    assert corrupt.status_code == 400 and corrupt.json()["error"]["code"] == "invalid_image", corrupt.text
    assert " at 0x" not in corrupt.text and "BytesIO" not in corrupt.text, corrupt.text
    slashed = server.client.post("/classify/image/", files={"file": b"x"}, headers={"Host": "evil.example"},
                                 follow_redirects=False)
    assert slashed.status_code == 404 and "location" not in slashed.headers, (slashed.status_code, slashed.headers)
    assert slashed.json()["error"]["code"] in ("not_found", "http_error"), slashed.text
