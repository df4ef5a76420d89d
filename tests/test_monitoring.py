"""The monitoring contract against a real predictor (`tests.conftest.Server`) scraped by a real
Prometheus (Debian's 2.42) the way the chart's PodMonitor says, evaluating the chart's rules:

- the seed's three PromQL queries, verbatim, return data after real /classify/image traffic; the
  README, the dashboard and the alerts use them;
- the class-mix drift alert (total-variation distance of a model version's predicted-class mix from
  the validation mix) stays quiet on a balanced stream of held-out images and fires on a skewed one;
  `promtool test rules` checks its logic on synthetic series (per version, small samples ignored).
"""

import json
import re
import time

import pytest
import yaml

from predictor.cifar import CLASSES

from .conftest import IMAGES, ROOT, Server, wait_until
from .deploy_common import CHART, NAMESPACE, PROMTOOL, RELEASE, SEED_QUERIES, Prometheus, one, render, rules_file, run, tool

DRIFT = "Cifar10ClassifierClassMixDrift"
JOBS_WAITING = "Cifar10ClassifierJobsWaiting"
# Scrape every second; the drift alert over a 1-minute window, at once, from 60 predictions (its
# threshold stays the chart's default).
LIVE_SETS = ("monitoring.podMonitor.interval=1s", "monitoring.podMonitor.scrapeTimeout=1s",
             "monitoring.prometheusRule.classMixDrift.window=1m", "monitoring.prometheusRule.classMixDrift.for=0s",
             "monitoring.prometheusRule.classMixDrift.minPredictions=60")
SELECTOR = 'namespace="$namespace", job="$job", '


@pytest.fixture(scope="module")
def predictor():
    """A predictor of its own: the class mix it counts is this module's traffic only."""
    server = Server("--rate_limit_per_minute", "0")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def prometheus(predictor, tmp_path_factory):
    objects = render(sets=LIVE_SETS)
    (endpoint,) = one(objects, "PodMonitor")["spec"]["podMetricsEndpoints"]
    folder = tmp_path_factory.mktemp("prometheus")
    prom = Prometheus(folder, f"127.0.0.1:{predictor.port}", endpoint, RELEASE,
                      {"namespace": NAMESPACE, "pod": f"{RELEASE}-predictor-00001-deployment-5d9c7-x2k4q"},
                      rules_file(objects, folder / "rules.yaml"))
    prom.rules = {r["alert"]: r for g in one(objects, "PrometheusRule")["spec"]["groups"] for r in g["rules"]}
    yield prom
    prom.stop()


def classify_batch(predictor, images: list[bytes]) -> list[str]:
    response = predictor.client.post("/classify/batch", files=[("files", (f"{i}.jpg", data, "image/jpeg"))
                                                               for i, data in enumerate(images)])
    assert response.status_code == 200, response.text
    return [r["predicted_class"] for r in response.json()["results"]]


def sample_value(prom, expression: str) -> float:
    (sample,) = prom.query(expression)
    return float(sample["value"][1])


# -- the drift alert, live -------------------------------------------------------------------------------
def test_the_class_mix_alert_is_quiet_on_a_balanced_stream_and_fires_on_a_skewed_one(predictor, prometheus, holdout):
    by_class = {c: [data for data, label in holdout if label == c] for c in range(len(CLASSES))}
    # One image per class first, so every class's series exists before the counted stream
    # (increase() counts from a series' first scrape).
    classify_batch(predictor, [images[0] for images in by_class.values()])
    wait_until(lambda: prometheus.has_data(f'predictor_predictions_total{{job="{RELEASE}"}}'), 30, "the first scrape")
    rule = prometheus.rules[DRIFT]
    threshold = float(re.search(r"> ([0-9.]+)", rule["expr"]).group(1))
    tvd = rule["expr"].split(">")[0]
    count = f'sum by (model_version) (increase(predictor_predictions_total{{job="{RELEASE}"}}[1m]))'

    # Balanced: 12 held-out images of each class, one of each per call.
    for i in range(1, 13):
        classify_batch(predictor, [images[i] for images in by_class.values()])
    wait_until(lambda: sample_value(prometheus, count) >= 100, 30, "the balanced stream to be scraped")
    for _ in range(3):  # a few evaluations of the rule
        balanced = sample_value(prometheus, tvd)
        assert balanced < threshold and DRIFT not in prometheus.firing(), balanced
        time.sleep(1)  # the rules are evaluated every second
    # Skewed: the other 180 cats of the held-out set.
    cats = by_class[CLASSES.index("cat")]
    for i in range(20, len(cats), 10):
        classify_batch(predictor, cats[i:i + 10])
    wait_until(lambda: DRIFT in prometheus.firing(), 30, "the drift alert to fire")
    skewed = sample_value(prometheus, tvd)
    assert skewed > threshold > balanced, (balanced, skewed)
    (alert,) = [a for a in prometheus.client.get("/api/v1/alerts").json()["data"]["alerts"] if a["labels"]["alertname"] == DRIFT]
    version = predictor.client.post("/classify/image", files={"file": ("cat.jpg", cats[0], "image/jpeg")}).json()["model_version"]
    assert alert["labels"]["model_version"] == version


# -- the seed's queries, live ------------------------------------------------------------------------------
def test_the_seeds_three_queries_return_data(predictor, prometheus):
    images = sorted(IMAGES.glob("*.jpg"))

    def traffic():
        for i, path in enumerate(images[:20]):
            assert predictor.client.post("/classify/image", files={"file": path.read_bytes()}).status_code == 200
            if i % 5 == 0:
                bad = predictor.client.post("/classify/image", files={"file": ("x.jpg", b"not an image", "image/jpeg")})
                assert bad.status_code == 415, bad.text

    traffic()
    # rate() needs two samples of a series: a second wave once the error series is scraped.
    wait_until(lambda: prometheus.has_data(f'api_requests_total{{job="{RELEASE}", endpoint="classify_image", status="error"}}'),
             30, "the error series to be scraped")
    traffic()
    wait_until(lambda: all(prometheus.has_data(q) for q in SEED_QUERIES), 30, "the seed's queries to return data", interval=1)
    # The seed's error query keeps the status (and code) label on both sides: each error series is
    # divided by itself, so it reads 1; the dashboard and the alert sum both sides for the share.
    assert {float(s["value"][1]) for s in prometheus.query(SEED_QUERIES[1])} == {1.0}
    share = sample_value(prometheus, 'sum(rate(api_requests_total{endpoint="classify_image", status="error"}[5m])) '
                                     '/ sum(rate(api_requests_total{endpoint="classify_image"}[5m]))')
    assert 0.05 < share < 0.5, share  # 4 in 24 per wave


# -- the queries the chart, the dashboard and the README use ----------------------------------------------------
def dashboard_expressions() -> list[str]:
    (dashboard,) = [json.loads(v) for v in one(render(), "ConfigMap")["data"].values()]
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def test_the_dashboard_and_the_alerts_use_the_seeds_queries():
    exprs = [e.replace(SELECTOR, "") for e in dashboard_expressions()]
    rate, error, p95 = SEED_QUERIES
    assert rate in exprs and p95 in exprs
    numerator, denominator = error.split(" / ")
    assert f"sum({numerator}) / sum({denominator})" in exprs
    rules = {r["alert"]: r["expr"] for g in one(render(), "PrometheusRule")["spec"]["groups"] for r in g["rules"]}
    sel = f'namespace="{NAMESPACE}", job="{RELEASE}", '
    assert "rate(api_request_latency_seconds_bucket{" + sel + 'endpoint="classify_image"}[5m])' in rules["Cifar10ClassifierHighLatencyP95"]
    assert 'status="error"' in rules["Cifar10ClassifierHighErrorRate"]


def test_the_readme_shows_the_seeds_queries_verbatim():
    for readme in (ROOT / "README.md", ROOT / "helm" / "README.md"):
        text = readme.read_text()
        assert all(q in text for q in SEED_QUERIES), readme
        assert 'endpoint="/classify/image"' not in text and "endpoint=\"/" not in text, readme


# -- the rules' logic, promtool ------------------------------------------------------------------------
def assert_promtool_passes_and_tells(tests: dict, tmp_path, never_firing: str) -> None:
    """`promtool test rules` passes `tests` on the chart's rules, and fails them on the rules rendered
    with `never_firing` (a threshold no series reaches): the tests can tell a rule that never fires."""
    test_file = tmp_path / "rules_test.yaml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = run([tool(PROMTOOL), "test", "rules", test_file], check=False)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    tests = {**tests, "rule_files": [str(rules_file(render(sets=(never_firing,)), tmp_path / "lax.yaml", annotations=False))]}
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    assert run([tool(PROMTOOL), "test", "rules", test_file], check=False).returncode != 0


def drift_series(version: str, per_minute: dict[str, str]) -> list[dict]:
    sel = f'namespace="{NAMESPACE}", job="{RELEASE}", model_version="{version}"'
    return [{"series": f'predictor_predictions_total{{{sel}, predicted_class="{c}"}}', "values": v}
            for c, v in per_minute.items()]


def test_promtool_the_drift_rule_fires_on_a_skewed_mix_only(tmp_path):
    values = yaml.safe_load((CHART / "values.yaml").read_text())["monitoring"]["prometheusRule"]["classMixDrift"]
    assert (values["window"], values["for"], values["minPredictions"]) == ("30m", "15m", 200)  # the times below
    rules = rules_file(render(), tmp_path / "rules.yaml", annotations=False)
    fired = [{"exp_labels": {"severity": values["severity"], "model_version": "canary"}}]
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            # stable: 10 per class per minute (uniform). canary: uniform for 20 minutes, then 60 cats
            # and 5 of each other class per minute (cat share 0.57, distance 0.47).
            {"interval": "1m", "input_series": [
                *drift_series("stable", {c: "0+10x90" for c in CLASSES}),
                *drift_series("canary", {c: "0+10x20 200+60x70" if c == "cat" else "0+10x20 200+5x70" for c in CLASSES}),
            ], "alert_rule_test": [
                {"eval_time": "19m", "alertname": DRIFT, "exp_alerts": []},
                {"eval_time": "80m", "alertname": DRIFT, "exp_alerts": fired},
            ]},
            # Mildly uneven (one class at 19 %, distance 0.1): quiet.
            {"interval": "1m", "input_series": drift_series("canary", {c: "0+20x90" if c == "cat" else "0+9x90" for c in CLASSES}),
             "alert_rule_test": [{"eval_time": "80m", "alertname": DRIFT, "exp_alerts": []}]},
            # Only cats, but 3 a minute (90 in the window, under minPredictions): quiet.
            {"interval": "1m", "input_series": drift_series("canary", {"cat": "0+3x90"}),
             "alert_rule_test": [{"eval_time": "80m", "alertname": DRIFT, "exp_alerts": []}]},
            # Only cats, 10 a minute; the other classes never predicted (no series at all): fires.
            {"interval": "1m", "input_series": drift_series("canary", {"cat": "0+10x90"}),
             "alert_rule_test": [{"eval_time": "80m", "alertname": DRIFT, "exp_alerts": fired}]},
        ],
    }
    assert_promtool_passes_and_tells(tests, tmp_path, "monitoring.prometheusRule.classMixDrift.threshold=1")


def test_promtool_the_jobs_waiting_rule_fires_on_a_job_that_waits_too_long(tmp_path):
    values = yaml.safe_load((CHART / "values.yaml").read_text())["monitoring"]["prometheusRule"]["jobsWaiting"]
    assert (values["thresholdSeconds"], values["for"]) == (600, "5m")  # the times below
    rules = rules_file(render(), tmp_path / "rules.yaml", annotations=False)
    # Two replicas report the shared store's oldest queued job; one has not scraped it yet.
    age = f'predictor_job_oldest_queued_age_seconds{{namespace="{NAMESPACE}", job="{RELEASE}"'
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            # A job waits from minute 0 on: its age passes 600 s after 10 minutes, and the alert fires 5 later.
            {"interval": "1m", "input_series": [
                {"series": age + ', pod="a"}', "values": "0+60x30"},
                {"series": age + ', pod="b"}', "values": "0x30"},
            ], "alert_rule_test": [
                {"eval_time": "14m", "alertname": JOBS_WAITING, "exp_alerts": []},
                {"eval_time": "20m", "alertname": JOBS_WAITING, "exp_alerts": [{"exp_labels": {"severity": values["severity"]}}]},
            ]},
            # Jobs start within 5 minutes: quiet.
            {"interval": "1m", "input_series": [{"series": age + ', pod="a"}', "values": "0+60x4 0+60x4 0+60x4 0+60x4"}],
             "alert_rule_test": [{"eval_time": "15m", "alertname": JOBS_WAITING, "exp_alerts": []}]},
        ],
    }
    assert_promtool_passes_and_tells(tests, tmp_path, "monitoring.prometheusRule.jobsWaiting.thresholdSeconds=100000")
