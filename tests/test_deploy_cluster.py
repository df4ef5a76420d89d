"""What the cluster does to the chart's objects, modelled from the source of KServe, Knative and
Istio, and checked against what the chart means: the rendered objects alone can be schema-valid and
still give no metrics, an open API or a gateway that gives up first.

- Knative's revision reconciler (knative/serving pkg/reconciler/revision/resources/deploy.go and
  queue.go) builds the pod: queue-proxy beside the user container, whose only port is renamed
  `user-port`. The PodMonitor must name a port of the predictor container on THAT pod.
- KServe's pod webhook (kserve pkg/webhook/admission/pod/metrics_aggregate_injector.go) rewrites
  `prometheus.io/port` to 9091 (queue-proxy's user metrics) or 9088 (aggregation) whenever
  `serving.kserve.io/enable-prometheus-scraping` is "true" on the pod or, unset there, in the
  cluster's inferenceservice-config. The annotation a scraper reads must still reach the predictor.
- Istio's AuthorizationPolicy matches the path as the proxy sees it (percent-encoding kept unless
  the mesh decodes it), while uvicorn decodes it: `/classify%2Fimage` is /classify/image.
- Timeouts, hosts, ingress exposure, optional CRDs, subchart use, the GPU pod's threads, the
  canary's S3 endpoint and the NetworkPolicy's gateway labels.
"""

import base64
import json
import re
from urllib.parse import unquote

import httpx
import pytest
import yaml

from .conftest import IMAGES, MODEL_NAME
from .deploy_common import (CHART, CI_VALUES, HELM, NAMESPACE, RELEASE, by_kind, kserve_pod, kserve_pod_webhook, one,
                            predictor_container, render, render_text, run, tool)

VALUE_SETS = [None, *CI_VALUES]
IDS = ["default", *(p.name.removesuffix("-values.yaml") for p in CI_VALUES)]
# inferenceservice-config's metricsAggregator settings a cluster may have (KServe's default is both "false").
CLUSTER_METRICS_CONFIGS = [{"enableMetricAggregation": "false", "enablePrometheusScraping": "false"},
                           {"enableMetricAggregation": "false", "enablePrometheusScraping": "true"},
                           {"enableMetricAggregation": "true", "enablePrometheusScraping": "true"}]


def mode_of(objects) -> str:
    return one(objects, "InferenceService")["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]


def metrics_port_of(pod: dict) -> int:
    """The port the predictor serves /metrics on, in the pod the cluster made (its only port)."""
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "kserve-container"]
    (port,) = container["ports"]
    return port["containerPort"]


# -- the pod Knative / KServe create, and who scrapes what on it --------------------------------------
@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_the_podmonitor_names_a_port_of_the_predictor_on_the_pod_the_cluster_creates(values_file):
    objects = render(values_file)
    monitors = by_kind(objects, "PodMonitor")
    if not monitors:
        pytest.skip("no PodMonitor in this value set")
    pod = kserve_pod(objects)
    (endpoint,) = monitors[0]["spec"]["podMetricsEndpoints"]
    # The Prometheus Operator keeps the targets whose container port has this name.
    named = [(c["name"], p["containerPort"]) for c in pod["spec"]["containers"] for p in c.get("ports", [])
             if p.get("name") == endpoint["port"]]
    assert named == [("kserve-container", metrics_port_of(pod))], \
        f"PodMonitor port {endpoint['port']!r} on the {mode_of(objects)} pod: {named}"
    selector = monitors[0]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()


@pytest.mark.parametrize("cluster", CLUSTER_METRICS_CONFIGS, ids=["cluster-scraping-off", "cluster-scraping-on", "cluster-aggregation-on"])
@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_scrape_annotations_after_kserves_webhook_point_at_the_predictor(values_file, cluster):
    objects = render(values_file)
    pod = kserve_pod_webhook(kserve_pod(objects), cluster)
    annotations = pod["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") != "true":
        assert "prometheus.io/port" not in annotations or cluster["enablePrometheusScraping"] == "true"
        pytest.skip("no scrape annotations in this value set")
    port = int(annotations["prometheus.io/port"])
    owners = [c["name"] for c in pod["spec"]["containers"] for p in c.get("ports", []) if p["containerPort"] == port]
    assert owners == ["kserve-container"] and port == metrics_port_of(pod), \
        f"prometheus.io/port {port} on the {mode_of(objects)} pod is served by {owners or 'nothing'}"
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_models_can_tell():
    """The pod model renames the port and adds queue-proxy; the webhook model rewrites the port."""
    objects = render()
    pod = kserve_pod(objects)
    names = {c["name"]: [p["name"] for p in c.get("ports", [])] for c in pod["spec"]["containers"]}
    assert names["kserve-container"] == ["user-port"] and "http-usermetric" in names["queue-proxy"]
    forced = kserve_pod_webhook(pod, {"enableMetricAggregation": "false", "enablePrometheusScraping": "true"},
                                pod_annotations={"serving.kserve.io/enable-prometheus-scraping": "true"})
    assert forced["metadata"]["annotations"]["prometheus.io/port"] == "9091"
    standard = kserve_pod(render(CHART / "ci" / "standard-values.yaml"))
    assert [c["name"] for c in standard["spec"]["containers"]] == ["kserve-container"]
    assert standard["spec"]["containers"][0]["ports"][0]["name"] == "http1"


# -- JWT at the mesh: an allow-list percent-encoding cannot sidestep -------------------------------------
PREDICTION_PATHS = ("/classify/image", "/classify/batch", "/v1/models/{model}:predict", "/v2/models/{model}/infer",
                    "/v2/models/{model}/versions/1/infer", "/v1/models/{model}:explain", "/classify/jobs")
# Raw paths a client may send that uvicorn decodes into a prediction path (Envoy's default BASE
# normalization resolves dot segments but keeps %2F, %3A and the like as they are).
ENCODED_PATHS = ("/classify%2Fimage", "/classify%2fbatch", "/%63lassify/image", "/v1/models/{model}%3Apredict",
                 "/v2/models/{model}%2Finfer", "/v2/models/{model}/%69nfer")


def istio_path_matches(pattern: str, path: str) -> bool:
    """Istio's path match: exact, `prefix*`, `*suffix` or `*`."""
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return path.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return path.endswith(pattern[1:])
    return path == pattern


def _operation_matches(op: dict, request: dict) -> bool:
    if "paths" in op and not any(istio_path_matches(p, request["path"]) for p in op["paths"]):
        return False
    if any(istio_path_matches(p, request["path"]) for p in op.get("notPaths", [])):
        return False
    if "ports" in op and str(request["port"]) not in op["ports"]:
        return False
    if "methods" in op and request["method"] not in op["methods"]:
        return False
    return True


def _rule_matches(rule: dict, request: dict) -> bool:
    for source in (f["source"] for f in rule.get("from", [])):
        if "requestPrincipals" in source and not request["principal"]:
            return False
        if "notRequestPrincipals" in source and request["principal"]:
            return False
    if "to" in rule and not any(_operation_matches(t["operation"], request) for t in rule["to"]):
        return False
    for condition in rule.get("when", []):
        match = re.fullmatch(r"request\.headers\[(.+)\]", condition["key"])
        assert match, condition
        value = request["headers"].get(match.group(1).lower())
        if value is None or not any(v == "*" or v == value for v in condition["values"]):
            return False
    return True


def istio_allows(policies: list[dict], request: dict) -> bool:
    """Istio's evaluation of the policies selecting a workload: any matching DENY refuses; then,
    if there are ALLOW policies, one of their rules must match."""
    if any(_rule_matches(r, request) for p in policies if p["spec"].get("action") == "DENY" for r in p["spec"]["rules"]):
        return False
    allows = [p for p in policies if p["spec"].get("action", "ALLOW") == "ALLOW"]
    return not allows or any(_rule_matches(r, request) for p in allows for r in p["spec"].get("rules", []))


def request(path, principal=False, port=8080, method="POST", headers=None):
    return {"path": path, "principal": principal, "port": port, "method": method, "headers": headers or {}}


JWT_SETS = [v for v in CI_VALUES if yaml.safe_load(v.read_text()).get("auth", {}).get("jwt", {}).get("enabled")]


@pytest.mark.parametrize("values_file", JWT_SETS, ids=lambda v: v.name.removesuffix("-values.yaml"))
def test_the_jwt_policy_cannot_be_sidestepped_by_encoding_the_path(values_file):
    objects = render(values_file)
    policies = by_kind(objects, "AuthorizationPolicy")
    model = next(a.split("=", 1)[1] for a in predictor_container(objects)["args"] if a.startswith("--model_name="))
    port = metrics_port_of(kserve_pod(objects))
    for raw in ENCODED_PATHS:
        raw = raw.format(model=model)
        assert unquote(raw) in {p.format(model=model) for p in PREDICTION_PATHS}, raw  # uvicorn's view
        assert not istio_allows(policies, request(raw, port=port)), f"{raw} passes without a token"
    for path in PREDICTION_PATHS:
        path = path.format(model=model)
        assert not istio_allows(policies, request(path, port=port)), f"{path} passes without a token"
        assert istio_allows(policies, request(path, principal=True, port=port)), f"{path} refused with a valid token"
    # Health, readiness and metrics stay open (Prometheus carries no token), as GETs only.
    for path in ("/health", "/metrics", "/v2/health/live", "/v2/health/ready", f"/v2/models/{model}/ready"):
        assert istio_allows(policies, request(path, port=port, method="GET")), path
        assert not istio_allows(policies, request(path + "/../../classify/image", port=port)), path
    if mode_of(objects) == "Knative":
        # Knative's autoscaler scrapes queue-proxy; the activator probes it with K-Network-Probe
        # (which queue-proxy answers itself, never passing it on).
        assert istio_allows(policies, request("/metrics", port=9090, method="GET"))
        assert istio_allows(policies, request("/", port=8012, method="GET", headers={"k-network-probe": "queue"}))
        assert not istio_allows(policies, request("/classify/image", port=8012))
        # Anyone can send the probe header, and queue-proxy passes on what it does not answer itself:
        # with it, no prediction, no job submitted, no job read or cancelled.
        for path, method in (("/classify/image", "POST"), ("/classify/jobs", "POST"), ("/classify/jobs/" + "0" * 32, "DELETE")):
            assert not istio_allows(policies, request(path, port=8012, method=method, headers={"k-network-probe": "queue"}))
        # ... on queue-proxy's ports only: sent straight to the predictor's port it would reach the app.
        assert not istio_allows(policies, request("/classify/image", port=port, headers={"k-network-probe": "queue"}))


def test_the_predictor_serves_the_encoded_paths(server):
    """The premise, on a real predictor: uvicorn decodes what Istio matched as sent, so every encoded
    path above reaches a prediction endpoint."""
    image = (IMAGES / "cat_0000.jpg").read_bytes()
    for raw in ENCODED_PATHS:
        url = httpx.URL(server.url + raw.format(model=MODEL_NAME))
        if ":predict" in unquote(raw) or "%3A" in raw:
            response = server.client.post(url, content=image, headers={"content-type": "image/jpeg"})
        elif "infer" in unquote(raw):
            response = server.client.post(url, json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                                 "data": [base64.b64encode(image).decode()]}]})
        else:
            field = "files" if "batch" in unquote(raw) else "file"
            response = server.client.post(url, files={field: ("cat.jpg", image, "image/jpeg")})
        assert response.status_code == 200, (raw, response.status_code, response.text[:200])


@pytest.mark.parametrize("values_file", JWT_SETS, ids=lambda v: v.name.removesuffix("-values.yaml"))
def test_jwt_on_gets_the_pod_a_sidecar(values_file):
    """Without an Istio sidecar the policies select nothing and refuse nothing."""
    pod = kserve_pod(render(values_file))
    assert pod["metadata"]["labels"].get("sidecar.istio.io/inject") == "true"


def test_the_evaluator_can_tell():
    """Today's kind of policy (DENY on `/classify/*` without a token) lets the encoded path through."""
    deny_list = [{"spec": {"action": "DENY", "rules": [{"from": [{"source": {"notRequestPrincipals": ["*"]}}],
                                                       "to": [{"operation": {"paths": ["/classify/*"]}}]}]}}]
    assert not istio_allows(deny_list, request("/classify/image"))
    assert istio_allows(deny_list, request("/classify%2Fimage"))


# -- the ingress exposes only prediction, health and docs ---------------------------------------------
# What the /docs page loads from the predictor (predictor/serving/docs.py), routed wherever /docs is.
DOCS_ASSETS = ("/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css", "/docs/start.js", "/docs/favicon.png")
@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_only_prediction_health_and_docs_are_reachable_from_outside(values_file):
    objects = render(values_file)
    isvc = one(objects, "InferenceService")
    routes = by_kind(objects, "VirtualService")
    if not routes:
        return
    model = next(a.split("=", 1)[1] for a in predictor_container(objects)["args"] if a.startswith("--model_name="))
    allowed = {p.format(model=model) for p in PREDICTION_PATHS} | {"/health", "/docs", "/openapi.json"} | set(DOCS_ASSETS)
    if {e["name"]: e.get("value") for e in predictor_container(objects)["env"]}.get("UI") == "true":
        allowed |= {"/", "/ui/app.js", "/ui/style.css"}  # the demo page (predictor/ui), a page like /docs
    for http in routes[0]["spec"]["http"]:
        for match in http["match"]:
            if "regex" in match["uri"]:  # a job's own path: 32 hex digits and nothing else
                assert match["uri"] == {"regex": "^/classify/jobs/[0-9a-f]{32}$"}, match
                continue
            assert set(match["uri"]) == {"exact"} and match["uri"]["exact"] in allowed, match
    # KServe's own route would expose every path (/metrics too) on the external gateway: cluster-local.
    assert isvc["metadata"]["labels"].get("networking.kserve.io/visibility") == "cluster-local"


# -- one timeout chain ---------------------------------------------------------------------------------
def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)", duration)
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[match.group(2)]


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_the_timeout_chain_lets_the_predictor_answer_first(values_file):
    objects = render(values_file)
    predictor = one(objects, "InferenceService")["spec"]["predictor"]
    deadline = float({e["name"]: e.get("value") for e in predictor_container(objects)["env"]}["REQUEST_TIMEOUT_S"])
    for route in by_kind(objects, "VirtualService"):
        for http in route["spec"]["http"]:
            timeout = _seconds(http["timeout"])
            assert timeout > deadline, f"the route ({timeout} s) gives up before the predictor's deadline ({deadline} s)"
            if http["retries"]["attempts"]:
                assert _seconds(http["retries"]["perTryTimeout"]) >= timeout, "a try is cut before the route's timeout"
            if mode_of(objects) == "Knative":
                assert predictor["timeout"] >= timeout, "Knative's revision timeout cuts the route's requests"
                if predictor["minReplicas"] == 0:  # scale from zero: the activator holds the request meanwhile
                    assert timeout >= deadline + 60, "no room for a cold start"
    if mode_of(objects) == "Knative":
        assert predictor["timeout"] > deadline


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_knative_waits_for_the_image_pull_and_the_startup_probe(values_file):
    objects = render(values_file)
    if mode_of(objects) != "Knative":
        return
    predictor = one(objects, "InferenceService")["spec"]["predictor"]
    container = predictor_container(objects)
    deadline = predictor["annotations"]["serving.knative.dev/progress-deadline"]
    probe = container.get("startupProbe", container["readinessProbe"])
    budget = probe["periodSeconds"] * probe["failureThreshold"]
    assert _seconds(deadline) >= budget + 300, f"progress deadline {deadline} leaves no time for the image pull"


# -- hosts, gateways, labels ------------------------------------------------------------------------------
@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_the_route_never_captures_every_host(values_file):
    for route in by_kind(render(values_file), "VirtualService"):
        assert route["spec"]["hosts"] and "*" not in route["spec"]["hosts"]
    for gateway in by_kind(render(values_file), "Gateway"):
        assert all("*" not in s["hosts"] for s in gateway["spec"]["servers"])


def test_two_releases_get_different_hosts():
    a = one(render(release="one"), "VirtualService")["spec"]["hosts"]
    b = one(render(release="two", namespace="other"), "VirtualService")["spec"]["hosts"]
    assert not set(a) & set(b)


def test_standard_mode_does_not_route_through_the_knative_gateway_by_default():
    objects = render(sets=("deploymentMode=Standard",))
    (route,) = by_kind(objects, "VirtualService")
    assert not any(g.startswith("knative-serving/") for g in route["spec"]["gateways"])
    (gateway,) = by_kind(objects, "Gateway")
    assert route["spec"]["gateways"] == [f"{NAMESPACE}/{gateway['metadata']['name']}"]


@pytest.mark.parametrize("labels", [{"istio": "ingressgateway"}, {"istio": "ingress"}], ids=["istioctl", "gateway-chart"])
@pytest.mark.parametrize("values_file", [v for v in CI_VALUES if yaml.safe_load(v.read_text()).get("networkPolicy", {}).get("enabled")],
                         ids=lambda v: v.name.removesuffix("-values.yaml"))
def test_the_network_policy_admits_either_istio_gateway_install(values_file, labels):
    """istioctl's default profile labels the gateway `istio: ingressgateway`, Istio's gateway Helm chart `istio: ingress`."""
    policy = one(render(values_file), "NetworkPolicy")
    pod_selectors = [p["podSelector"] for r in policy["spec"]["ingress"] for p in r["from"] if "podSelector" in p]
    assert any(selects(s, labels) for s in pod_selectors), pod_selectors


def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector on a pod's labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        ok = {"In": value in expr.get("values", []), "NotIn": value not in expr.get("values", []),
              "Exists": value is not None, "DoesNotExist": value is None}[expr["operator"]]
        if not ok:
            return False
    return True


# -- the dashboard, subchart use, optional CRDs -----------------------------------------------------------
def dashboard_uid(release, namespace):
    configmap = one(render(release=release, namespace=namespace), "ConfigMap")
    (dashboard,) = [json.loads(v) for v in configmap["data"].values()]
    return dashboard["uid"]


def test_the_grafana_uid_fits_and_is_unique_per_namespace():
    long_name = "a-rather-long-release-name-for-cifar10-classifier"
    uids = {dashboard_uid(long_name, "team-a"), dashboard_uid(long_name, "team-b"), dashboard_uid(RELEASE, NAMESPACE)}
    assert len(uids) == 3 and all(len(u) <= 40 and re.fullmatch(r"[a-zA-Z0-9_-]+", u) for u in uids), uids


def test_the_chart_can_be_a_subchart():
    """A parent chart passes `global` and the subchart's `enabled` condition in its values."""
    text = render_text(sets=("global.imageRegistry=registry.example.com", "enabled=true"))
    assert "kind: InferenceService" in text


def test_optional_crs_follow_the_cluster_apis():
    """Without the Prometheus Operator's (or Istio's) APIs nothing of theirs renders, so `helm install`
    does not fail there; extraAPIVersions forces them (CRDs installed in the same sync)."""
    bare = [d["kind"] for d in yaml.safe_load_all(render_text(api_versions=())) if d]
    assert "PodMonitor" not in bare and "PrometheusRule" not in bare and "VirtualService" not in bare
    assert "InferenceService" in bare
    forced = [d["kind"] for d in yaml.safe_load_all(render_text(
        api_versions=(), sets=("extraAPIVersions={monitoring.coreos.com/v1/PodMonitor}",))) if d]
    assert "PodMonitor" in forced and "PrometheusRule" not in forced
    # Without its own route the chart leaves KServe's route external, or nothing would reach the model.
    isvc = one([d for d in yaml.safe_load_all(render_text(api_versions=())) if d], "InferenceService")
    assert "networking.kserve.io/visibility" not in isvc["metadata"].get("labels", {})


def test_jwt_without_istio_fails_instead_of_leaving_the_api_open():
    result = run([tool(HELM), "template", RELEASE, CHART, "--values", CHART / "ci" / "secure-knative-values.yaml"], check=False)
    assert result.returncode != 0 and "security.istio.io" in result.stderr, result.stderr


# -- the GPU pod's threads, the canary's credentials -------------------------------------------------------
@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_intra_op_threads_follow_the_cpu_limit(values_file):
    objects = render(values_file)
    container = predictor_container(objects)
    env = {e["name"]: e.get("value") for e in container["env"]}
    limit = str(container["resources"].get("limits", {}).get("cpu", ""))
    cores = int(limit[:-1]) // 1000 if limit.endswith("m") else int(float(limit or 0))
    assert int(env["INTRA_OP_THREADS"]) == max(1, cores), (limit, env["INTRA_OP_THREADS"])


def test_the_canarys_s3_endpoint_is_not_on_the_service_account():
    """KServe's storage initializer reads serving.kserve.io/s3-* from the credentials Secret."""
    objects = render(CHART / "ci" / "canary-values.yaml")
    for account in by_kind(objects, "ServiceAccount"):
        assert not any(k.startswith("serving.kserve.io/s3-") for k in account["metadata"].get("annotations", {}))
