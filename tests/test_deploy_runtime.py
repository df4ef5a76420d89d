"""The chart's promises, checked against a real predictor process and a real Prometheus.

Contract: the chart is rendered, and the predictor from this project's venv (`python -m predictor`,
not the container image: tests/test_image.py runs the image itself as the chart's pod) is started
in an empty working folder with exactly the kserve-container's args, env and port. Every probe
path answers 200 on that port, the VirtualService's paths are served, NOTES.txt's curl commands
work, and every metric the PrometheusRule, the dashboard and the KEDA query use is on /metrics.

Monitoring: Debian's Prometheus (2.42) scrapes the predictor as the PodMonitor says (path, port,
interval, job label) and evaluates the PrometheusRule's groups. After real traffic, the seed's
three queries and every dashboard expression return data through the HTTP API, the error-rate
and latency alerts fire (thresholds lowered to 0 through the chart's values), and the no-replica
alert fires once the predictor is stopped. `promtool check rules` passes, and `promtool test rules`
shows each alert firing on a synthetic error burst, latency rise or outage and quiet otherwise.
"""

import base64
import concurrent.futures
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from types import SimpleNamespace

import httpx
import pytest
import yaml

from predictor.config import declared

from .conftest import IMAGES, free_port, stop_process, wait_until
from .deploy_common import (CHART, NAMESPACE, PROMTOOL, RELEASE, SEED_QUERIES, Prometheus, kserve_pod, one,
                            predictor_container, render, render_notes, rules_file, run, tool)

# Form field of each routed form path.
FORM_FIELDS = {"/classify/image": "file", "/classify/batch": "files"}
# Every variable the predictor reads (predictor.config declares them; KServe's storage initializer
# and torch's caches besides): the chart's pod must not inherit any of them from this machine.
PREDICTOR_ENV = tuple(f.metadata["env"] for f in declared() if f.metadata["env"]) + (
    "STORAGE_URI", "MODEL_NAME", "API_KEYS", "TORCHINDUCTOR_CACHE_DIR")
# The module sends a few hundred requests from one address within a minute (traffic, scrapes):
# the chart's per-client rate limit (100/min) is lifted through its own value for the contract.
# This machine has no GPU: the pod the chart renders for a CPU node (a GPU pod stops here, as it must).
CONTRACT_SETS = ("rateLimit.perMinute=0", "gpu.enabled=false")
# The live Prometheus: scrape every second, and alert at once on any error or latency.
LIVE_SETS = ("monitoring.podMonitor.interval=1s", "monitoring.podMonitor.scrapeTimeout=1s",
             "monitoring.prometheusRule.errorRate.threshold=0", "monitoring.prometheusRule.errorRate.for=0s",
             "monitoring.prometheusRule.errorRate.codeRegex=4..|5..", "monitoring.prometheusRule.latency.threshold=0",
             "monitoring.prometheusRule.latency.for=0s", "monitoring.prometheusRule.noReadyReplicas.for=0s")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """The predictor process with the chart's default InferenceService args, env and port (the
    project venv's python; the image runs in tests/test_image.py)."""
    # The chart's port (8080), unless something on this machine holds it: then the chart is
    # rendered with another containerPort, and everything below follows the rendered value.
    sets = CONTRACT_SETS if port_is_free(8080) else (*CONTRACT_SETS, f"containerPort={free_port()}")
    objects = render(sets=sets)
    container = predictor_container(objects)
    port = container["ports"][0]["containerPort"]
    env = {e["name"]: e["value"] for e in container["env"]}
    workdir = tmp_path_factory.mktemp("app")  # an empty working folder, as the image's WORKDIR
    # The pod's /tmp is an emptyDir of its own: paths under it (torch.compile's cache) go to a
    # private folder here, not to this machine's shared /tmp.
    pod_tmp = tmp_path_factory.mktemp("pod-tmp")
    env = {k: str(pod_tmp / v[len("/tmp/"):]) if v.startswith("/tmp/") else v for k, v in env.items()}
    log_path = workdir.parent / "predictor.log"
    log = open(log_path, "w")
    base_env = {k: v for k, v in os.environ.items() if k not in PREDICTOR_ENV}
    process = subprocess.Popen([sys.executable, "-m", "predictor", *container["args"]], cwd=workdir,
                               env={**base_env, **env}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=60)
    startup = container["startupProbe"]["httpGet"]["path"]

    def started():
        assert process.poll() is None, f"predictor exited {process.returncode}:\n{log_path.read_text()}"
        return client.get(startup).status_code == 200

    try:
        # The chart serves precision auto: compiled at load, which takes minutes on 2 cores (the
        # chart's startup probe allows 10).
        wait_until(started, 600, f"{startup} to answer 200 (log: {log_path})")
        yield SimpleNamespace(objects=objects, container=container, port=port, url=url, client=client, sets=sets,
                              process=process, log_path=log_path)
    finally:
        client.close()
        stop_process(process)
        log.close()


def send_traffic(url: str, holdout: list, wave: int) -> dict:
    """Real requests on every prediction path: successes, client errors, a batch; some at once. Each
    wave sends held-out images no earlier wave sent: a repeated image is answered from the result
    cache, without a forward pass (and so without a batch to count)."""
    images = [data for data, _ in holdout[wave * 100: wave * 100 + 40]]
    counts = {"ok": 0, "error": 0}

    def one_request(i: int) -> int:
        with httpx.Client(base_url=url, timeout=60) as c:
            if i % 10 == 9:
                return c.post("/classify/image", files={"file": ("x.jpg", b"not an image", "image/jpeg")}).status_code
            if i % 10 == 8:
                return c.post("/classify/batch", files=[("files", (f"{i}-{k}.jpg", images[(i + k) % 40], "image/jpeg"))
                                                        for k in (1, 2, 3)]).status_code
            return c.post("/classify/image", files={"file": ("x.jpg", images[i], "image/jpeg")}).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for status in pool.map(one_request, range(40)):
            counts["ok" if status == 200 else "error"] += 1
    assert counts == {"ok": 36, "error": 4}, counts
    return counts


# -- the contract -----------------------------------------------------------------------------------
def test_container_args_env_and_port_agree(deployed):
    args = deployed.container["args"]
    assert f"--http_port={deployed.port}" in args
    assert any(a.startswith("--model_name=") for a in args)
    model_name = next(a.split("=", 1)[1] for a in args if a.startswith("--model_name="))
    info = deployed.client.get("/health").json()
    assert info["model_loaded"] is True and info["name"] == model_name
    assert info["max_batch_size"] == int(next(e["value"] for e in deployed.container["env"] if e["name"] == "MAX_BATCH_SIZE"))


def test_every_probe_path_answers_200_on_the_container_port(deployed):
    probes = {name: deployed.container[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    for name, probe in probes.items():
        assert probe["port"] == deployed.port, name
        response = httpx.get(f"http://127.0.0.1:{probe['port']}{probe['path']}", timeout=10)
        assert response.status_code == 200, f"{name} {probe['path']}: {response.status_code} {response.text}"


def test_every_routed_path_is_served(deployed):
    """Each path the route exposes answers on the predictor: the form endpoints and KServe's v1/v2
    classify an image, health and docs answer a GET, a job is submitted and its status URL (the route's
    one pattern) read (nothing else is routed: test_deploy_cluster)."""
    route = one(deployed.objects, "VirtualService")
    matches = [m["uri"] for m in route["spec"]["http"][0]["match"]]
    paths = [m["exact"] for m in matches if "exact" in m]
    patterns = [re.compile(m["regex"]) for m in matches if "regex" in m]
    assert "/classify/image" in paths and len(paths) + len(patterns) == len(matches)
    image = (IMAGES / "cat_0000.jpg").read_bytes()
    for path in paths:
        if path == "/classify/jobs":
            response = deployed.client.post(path, files=[("files", ("cat.jpg", image, "image/jpeg"))])
            assert response.status_code == 202, (path, response.text)
            status_url = response.json()["status_url"]
            assert [p for p in patterns if p.match(status_url)], (status_url, patterns)
            assert deployed.client.get(status_url).status_code == 200
            continue
        if path in FORM_FIELDS:
            response = deployed.client.post(path, files=[(FORM_FIELDS[path], ("cat.jpg", image, "image/jpeg"))])
        elif path.endswith((":predict", ":explain")):
            response = deployed.client.post(path, content=image, headers={"content-type": "image/jpeg"})
        elif path.endswith("/infer"):
            response = deployed.client.post(path, json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                                    "data": [base64.b64encode(image).decode()]}]})
        else:
            response = deployed.client.get(path)
            assert response.status_code == 200, (path, response.text)
            continue
        assert response.status_code == 200, (path, response.text)
        body = response.json()
        if path.endswith((":predict", "/classify/image", "/classify/batch")):
            result = (body.get("results") or body.get("predictions") or [body])[0]
            assert result["predicted_class"], (path, body)


def test_the_curl_commands_of_the_notes_work(deployed, tmp_path):
    notes = render_notes(sets=deployed.sets)
    commands = [line.strip() for line in notes.splitlines() if line.strip().startswith("curl ")]
    assert len(commands) == 2, notes
    shutil.copy(IMAGES / "cat_0000.jpg", tmp_path / "cat.jpg")
    for command in commands:
        # The ingress gateway and the port-forward both end at this container port.
        command = command.replace("127.0.0.1:8080", f"127.0.0.1:{deployed.port}")
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                                env={**os.environ, "INGRESS_HOST": f"127.0.0.1:{deployed.port}"})
        assert result.returncode == 0, (command, result.stderr)
        body = json.loads(result.stdout)
        assert {"predicted_class", "confidence", "all_probabilities", "timestamp"} <= body.keys(), (command, body)


PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


def promql_metric_names(expression: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, label
    names (inside {} or by/on/... lists), string contents or durations."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        if not e[match.end():].lstrip().startswith("(") and match.group() not in PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def dashboard_expressions(objects: list[dict], job: str) -> list[str]:
    configmap = one(objects, "ConfigMap")
    (dashboard,) = [json.loads(v) for v in configmap["data"].values()]
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert exprs
    return [e.replace("$namespace", NAMESPACE).replace("$job", job).replace("$__rate_interval", "1m") for e in exprs]


def rule_expressions(objects: list[dict]) -> dict[str, str]:
    rule = one(objects, "PrometheusRule")
    return {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}


def test_every_metric_used_by_the_rules_dashboard_and_keda_is_exported(deployed, holdout):
    send_traffic(deployed.url, holdout, wave=0)
    exported = {line.split("{")[0].split(" ")[0] for line in deployed.client.get("/metrics").text.splitlines()
                if line and not line.startswith("#")}
    keda = one(render(CHART / "ci" / "standard-keda-values.yaml"), "InferenceService")
    keda_query = keda["spec"]["predictor"]["autoScaling"]["metrics"][0]["external"]["metric"]["query"]
    used = set()
    for expression in [*rule_expressions(deployed.objects).values(), *dashboard_expressions(deployed.objects, RELEASE),
                       keda_query, *SEED_QUERIES]:
        used |= promql_metric_names(expression) or {"?" + expression}
    used.discard("up")  # Prometheus' own series for every target
    assert used and not used - exported, f"not on /metrics: {sorted(used - exported)}"
    assert {"api_requests_total", "api_request_latency_seconds_bucket", "predictor_batch_size_bucket",
            "predictor_queue_depth"} <= used


# -- promtool --------------------------------------------------------------------------------------
def test_promtool_check_rules(tmp_path):
    result = run([tool(PROMTOOL), "check", "rules", rules_file(render(), tmp_path / "rules.yaml")])
    assert "SUCCESS: 5 rules found" in result.stdout, result.stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"alert": "A", "expr": "sum(rate(x[5m])"}]}]}))
    assert run([tool(PROMTOOL), "check", "rules", broken], check=False).returncode != 0


def test_promtool_unit_tests_each_alert(tmp_path):
    """Synthetic series for the default thresholds: each alert fires on its condition (after its
    `for`) and stays quiet before it; client errors (4xx) alone do not page."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())["monitoring"]["prometheusRule"]
    objects = render()
    # Annotations are checked by `promtool check rules`; the unit tests compare labels.
    rules = rules_file(objects, tmp_path / "rules.yaml", annotations=False)
    sel = f'namespace="{NAMESPACE}", job="{RELEASE}"'
    api = f'api_requests_total{{{sel}, endpoint="classify_image"'
    error_ratio = 2 * values["errorRate"]["threshold"]  # twice the threshold, during the burst
    errors_per_min = math.ceil(900 * error_ratio / (1 - error_ratio))
    t = values["latency"]["threshold"]
    fast, slow = t / 5, 2 * t  # bucket bounds: all under the threshold, then all above it

    def bucket(le, values_):
        return {"series": f'api_request_latency_seconds_bucket{{{sel}, endpoint="classify_image", le="{le}"}}',
                "values": values_}

    def minutes(duration: str) -> int:
        return int(re.fullmatch(r"(\d+)m", duration).group(1))

    err_for, lat_for, up_for = (minutes(values[k]["for"]) for k in ("errorRate", "latency", "noReadyReplicas"))
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {"interval": "1m", "input_series": [
                {"series": f'{api}, status="success", code="200"}}', "values": "0+600x60"},
                {"series": f'{api}, status="error", code="415"}}', "values": "0+300x60"},  # 33% client errors: no page
                {"series": f'{api}, status="error", code="500"}}', "values": f"0x10 0+{errors_per_min}x50"},
                {"series": f"up{{{sel}}}", "values": "1x60"},
            ], "alert_rule_test": [
                {"eval_time": "9m", "alertname": "Cifar10ClassifierHighErrorRate", "exp_alerts": []},
                {"eval_time": f"{12 + err_for + 2}m", "alertname": "Cifar10ClassifierHighErrorRate",
                 "exp_alerts": [{"exp_labels": {"severity": values["errorRate"]["severity"]}}]},
                {"eval_time": "40m", "alertname": "Cifar10ClassifierNoReadyReplicas", "exp_alerts": []},
            ]},
            {"interval": "1m", "input_series": [
                bucket(fast, "0+600x15 9000x30"), bucket(t, "0+600x15 9000x30"),
                bucket(slow, "0+600x45"), bucket("+Inf", "0+600x45"),
            ], "alert_rule_test": [
                {"eval_time": "14m", "alertname": "Cifar10ClassifierHighLatencyP95", "exp_alerts": []},
                {"eval_time": f"{15 + lat_for + 3}m", "alertname": "Cifar10ClassifierHighLatencyP95",
                 "exp_alerts": [{"exp_labels": {"severity": values["latency"]["severity"]}}]},
            ]},
            {"interval": "1m", "input_series": [
                {"series": f"up{{{sel}}}", "values": "1x10 0x30"},
            ], "alert_rule_test": [
                {"eval_time": "9m", "alertname": "Cifar10ClassifierNoReadyReplicas", "exp_alerts": []},
                {"eval_time": f"{11 + up_for + 2}m", "alertname": "Cifar10ClassifierNoReadyReplicas",
                 "exp_alerts": [{"exp_labels": {"severity": values["noReadyReplicas"]["severity"]}}]},
            ]},
            {"interval": "1m", "input_series": [], "alert_rule_test": [
                # No series at all (the pods were never scraped): that is an outage too.
                {"eval_time": f"{up_for + 2}m", "alertname": "Cifar10ClassifierNoReadyReplicas",
                 "exp_alerts": [{"exp_labels": {"severity": values["noReadyReplicas"]["severity"]}}]},
            ]},
        ],
    }
    test_file = tmp_path / "rules_test.yaml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = run([tool(PROMTOOL), "test", "rules", test_file], check=False)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    # The same tests fail against rules that never fire: they can tell.
    tests["rule_files"] = [str(rules_file(render(sets=("monitoring.prometheusRule.errorRate.threshold=1",
                                                         "monitoring.prometheusRule.latency.threshold=100")),
                                          tmp_path / "lax.yaml", annotations=False))]
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    assert run([tool(PROMTOOL), "test", "rules", test_file], check=False).returncode != 0


# -- a real Prometheus -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prometheus(deployed, tmp_path_factory):
    objects = render(sets=(*deployed.sets, *LIVE_SETS))
    monitor = one(objects, "PodMonitor")
    isvc = one(objects, "InferenceService")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    # The PodMonitor's named port must be the predictor's on the pod the cluster makes (Knative
    # renames it), and its selector KServe's pod labels.
    pod = kserve_pod(objects)
    (port,) = [p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", []) if p["name"] == endpoint["port"]]
    assert port == deployed.port
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector == {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"], "component": "predictor"}
    job = selector[monitor["spec"]["jobLabel"]]  # the pod label's value becomes the job label
    tmp = tmp_path_factory.mktemp("prometheus")
    labels = {"namespace": NAMESPACE, "container": "kserve-container",
              "pod": f"{isvc['metadata']['name']}-predictor-00001-deployment-5d9c7-x2k4q"}
    prom = Prometheus(tmp, f"127.0.0.1:{port}", endpoint, job, labels, rules_file(objects, tmp / "rules.yaml"))
    prom.objects, prom.job, prom.endpoint, prom.port = objects, job, endpoint, port
    try:
        yield prom
    finally:
        prom.stop()


def test_prometheus_scrapes_the_predictor_as_the_podmonitor_says(prometheus):
    def target_up():
        (target,) = prometheus.client.get("/api/v1/targets").json()["data"]["activeTargets"]
        return target if target["health"] == "up" else None

    target = wait_until(target_up, 30, "the scrape target to be up")
    assert target["scrapeUrl"] == f"http://127.0.0.1:{prometheus.port}{prometheus.endpoint['path']}"
    assert target["scrapeInterval"] == prometheus.endpoint["interval"]
    assert target["labels"]["job"] == prometheus.job == RELEASE
    assert target["labels"]["namespace"] == NAMESPACE
    assert wait_until(lambda: prometheus.has_data(f'up{{namespace="{NAMESPACE}", job="{RELEASE}"}} == 1'), 10, "up == 1")


def test_after_real_traffic_every_query_returns_data_and_the_alerts_fire(deployed, prometheus, holdout):
    # Before the first scrape no replica was known to serve: that alert resolves once scraped.
    wait_until(lambda: "Cifar10ClassifierNoReadyReplicas" not in prometheus.firing(), 30, "the no-replica alert to resolve")
    send_traffic(deployed.url, holdout, wave=1)
    # rate() sees only increases between scrapes: a series born with the first 400s reads as a flat
    # line, so send a second wave once Prometheus has the error series.
    wait_until(lambda: prometheus.has_data(f'api_requests_total{{job="{RELEASE}", code=~"4.."}}'), 30,
             "the error series to be scraped", interval=1)
    send_traffic(deployed.url, holdout, wave=2)
    expressions = [*SEED_QUERIES, *dashboard_expressions(prometheus.objects, prometheus.job)]
    missing = expressions

    def all_have_data():
        nonlocal missing
        missing = [e for e in missing if not prometheus.has_data(e)]
        return not missing

    try:
        wait_until(all_have_data, 60, "every query to return data", interval=1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; no data: {missing}") from None
    rules = rule_expressions(prometheus.objects)
    for alert in ("Cifar10ClassifierHighErrorRate", "Cifar10ClassifierHighLatencyP95"):
        # the rule's own expression, thresholds at 0
        assert wait_until(lambda: prometheus.has_data(rules[alert]), 30, alert, interval=1), alert
    wait_until(lambda: {"Cifar10ClassifierHighErrorRate", "Cifar10ClassifierHighLatencyP95"} <= prometheus.firing(), 30,
             "the error-rate and latency alerts to fire")
    assert "Cifar10ClassifierNoReadyReplicas" not in prometheus.firing()
    # The rules Prometheus loaded are the chart's, all healthy.
    groups = prometheus.client.get("/api/v1/rules").json()["data"]["groups"]
    loaded = {r["name"]: r["health"] for g in groups for r in g["rules"]}
    assert loaded == {name: "ok" for name in rules}, loaded


def test_the_no_replica_alert_fires_when_the_predictor_stops(deployed, prometheus):
    """Last in this module: it stops the predictor."""
    wait_until(lambda: prometheus.has_data(f'up{{job="{RELEASE}"}} == 1'), 30, "the target to be up")
    wait_until(lambda: "Cifar10ClassifierNoReadyReplicas" not in prometheus.firing(), 30, "the no-replica alert to be quiet")
    deployed.process.terminate()
    deployed.process.wait(30)
    wait_until(lambda: "Cifar10ClassifierNoReadyReplicas" in prometheus.firing(), 30, "the no-replica alert to fire")
