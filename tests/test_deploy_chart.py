"""The Helm chart: `helm lint --strict` and `helm template` for every value set (the defaults and
helm/cifar10-classifier/ci/*-values.yaml: Standard mode, Standard with KEDA, CPU only, canary,
monitoring off, and the hardened Standard and Knative sets); every rendered object validated strictly (core kinds with kubernetes-validate at
Kubernetes 1.29 and 1.34, custom resources against the vendored CRDs in tests/data/schemas, unknown
fields fail, a kind covered by neither fails); KServe's and Knative's admission rules that no
schema carries; bad values refused by values.schema.json; the hardening (pod security, grace
period vs drain, API-key Secret, JWT policy paths, NetworkPolicy peers and ports, PDB, gateway
TLS); NOTES.txt; documentation of every value; checkov on the chart, on the pod KServe creates
from the InferenceService and on the hardened objects."""

import json
import os
import re
import tempfile
from pathlib import Path

import pytest
import yaml

from .deploy_common import (CHART, CHECKOV, CI_VALUES, HELM, KUBE_VERSIONS, NAMESPACE, OPTIONAL_APIS, RELEASE, ROOT, NotCovered,
                            by_kind, istio_port_protocol, kserve_pod, kserve_predictor_service, one, predictor_container, render,
                            render_notes, run, tool, validate_object)

VALUE_SETS = [None, *CI_VALUES]
IDS = ["default", *(p.name.removesuffix("-values.yaml") for p in CI_VALUES)]


def values_of(values_file: Path | None) -> dict:
    """The chart's defaults merged with a value set (as helm does for maps)."""
    def merge(base, over):
        if isinstance(base, dict) and isinstance(over, dict):
            return {**base, **{k: merge(base.get(k), v) for k, v in over.items()}}
        return over
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    return merge(defaults, yaml.safe_load(values_file.read_text())) if values_file else defaults


def test_value_sets_cover_the_issue():
    assert {"standard", "standard-keda", "cpu", "canary", "monitoring-off", "secure-standard", "secure-knative"} <= set(IDS)
    # The hardening options are each on in some value set (issue 6).
    secure = [values_of(CHART / "ci" / f"{name}-values.yaml") for name in ("secure-standard", "secure-knative")]
    for v in secure:
        assert v["auth"]["apiKeys"]["existingSecret"] and v["auth"]["jwt"]["enabled"] and v["networkPolicy"]["enabled"]
    assert {v["deploymentMode"] for v in secure} == {"Standard", "Knative"}
    assert secure[0]["istio"]["gateway"]["tls"]["enabled"] and secure[0]["podDisruptionBudget"]["minAvailable"] == 2


# -- helm lint and strict validation of every rendered object ----------------------------------------
@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_helm_lint_strict(values_file):
    args = ["--values", values_file] if values_file else []
    # helm lint has no --api-versions: the optional APIs come through the chart's extraAPIVersions.
    apis = ["--set", "extraAPIVersions={" + ",".join(OPTIONAL_APIS) + "}"]
    result = run([tool(HELM), "lint", "--strict", CHART, "--namespace", NAMESPACE, *args, *apis])
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    # A template's `fail` is only an [INFO] line to helm lint, and nothing was rendered.
    assert not re.search(r"\[(WARNING|ERROR)\]|\[INFO\] Fail", result.stdout + result.stderr), result.stdout + result.stderr


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_every_rendered_object_validates_strictly(values_file):
    objects = render(values_file)
    how = {f"{o['kind']}/{o['metadata']['name']}": validate_object(o) for o in objects}
    assert any(k.startswith("InferenceService/") for k in how), how
    for obj in objects:
        assert obj["metadata"]["namespace"] == NAMESPACE, f"{obj['kind']} without the release namespace"
    # Names that Kubernetes, KServe and Knative accept.
    for obj in objects:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"]) and len(obj["metadata"]["name"]) <= 63


MUTATIONS = {
    "InferenceService: unknown predictor field": ("InferenceService", lambda o: o["spec"]["predictor"].update(replicas=2)),
    "InferenceService: unknown container field": (
        "InferenceService", lambda o: o["spec"]["predictor"]["containers"][0].update(imagePullPolicyy="Always")),
    "InferenceService: unknown probe field": (
        "InferenceService", lambda o: o["spec"]["predictor"]["containers"][0]["readinessProbe"]["httpGet"].update(paht="/")),
    "InferenceService: scaleMetric out of its enum": ("InferenceService", lambda o: o["spec"]["predictor"].update(scaleMetric="gpu")),
    "InferenceService: unknown metadata field": ("InferenceService", lambda o: o["metadata"].update(labelz={})),
    "InferenceService: wrong type": ("InferenceService", lambda o: o["spec"]["predictor"].update(minReplicas="one")),
    "VirtualService: unknown route field": ("VirtualService", lambda o: o["spec"]["http"][0].update(timeoutt="1s")),
    "VirtualService: unknown match field": ("VirtualService", lambda o: o["spec"]["http"][0]["match"][0]["uri"].update(exactt="/")),
    "PodMonitor: unknown endpoint field": ("PodMonitor", lambda o: o["spec"]["podMetricsEndpoints"][0].update(portt="x")),
    "PrometheusRule: unknown rule field": ("PrometheusRule", lambda o: o["spec"]["groups"][0]["rules"][0].update(exprr="up")),
    "ConfigMap: unknown top-level field": ("ConfigMap", lambda o: o.update(dataa={})),
    "ServiceAccount: unknown field": ("ServiceAccount", lambda o: o.update(automount=True)),
    "AuthorizationPolicy: action out of its enum": ("AuthorizationPolicy", lambda o: o["spec"].update(action="REJECT"), "secure-standard"),
    "AuthorizationPolicy: unknown operation field": (
        "AuthorizationPolicy", lambda o: o["spec"]["rules"][1]["to"][0]["operation"].update(pathz=["/"]), "secure-standard"),
    "RequestAuthentication: unknown JWT rule field": (
        "RequestAuthentication", lambda o: o["spec"]["jwtRules"][0].update(jwksUrl="x"), "secure-standard"),
    "Gateway: unknown TLS field": ("Gateway", lambda o: o["spec"]["servers"][0]["tls"].update(secretName="x"), "secure-standard"),
    "Gateway: TLS mode out of its enum": ("Gateway", lambda o: o["spec"]["servers"][0]["tls"].update(mode="STRICT"), "secure-standard"),
    "PodDisruptionBudget: unknown field": ("PodDisruptionBudget", lambda o: o["spec"].update(maxUnavailablee=1), "secure-standard"),
    "NetworkPolicy: unknown peer field": (
        "NetworkPolicy", lambda o: o["spec"]["ingress"][0]["from"][0].update(namespace="x"), "secure-standard"),
}


@pytest.mark.parametrize("case", MUTATIONS, ids=list(MUTATIONS))
def test_validation_refuses_unknown_fields_and_bad_types(case):
    kind, mutate, *value_set = MUTATIONS[case]
    obj = one(render(CHART / "ci" / f"{value_set[0]}-values.yaml" if value_set else None), kind)
    validate_object(obj)  # valid as rendered ...
    mutate(obj)
    with pytest.raises(AssertionError) as refused:  # ... and refused once broken
        validate_object(obj)
    assert not isinstance(refused.value, NotCovered), refused.value


@pytest.mark.parametrize("api_version, kind", [("keda.sh/v1alpha1", "ScaledObject"), ("serving.knative.dev/v1", "Service"),
                                               ("serving.kserve.io/v1alpha9", "InferenceService"),
                                               ("apps.example.com/v1", "Deployment")])
def test_a_kind_covered_by_no_schema_fails(api_version, kind):
    with pytest.raises(NotCovered):
        validate_object({"apiVersion": api_version, "kind": kind, "metadata": {"name": "x", "namespace": NAMESPACE}})


# -- values.schema.json and the chart's own checks refuse bad values ----------------------------------
BAD_VALUES = {
    "unknown key": (["--set", "replicaCount=2"], "replicaCount"),
    "legacy mode name": (["--set", "deploymentMode=Serverless"], "deploymentMode"),
    "canary in Standard mode": (["--set", "deploymentMode=Standard", "--set", "canaryTrafficPercent=10",
                                 "--set", "istio.gateway.create=true"], "canaryTrafficPercent"),
    "scale to zero in Standard mode": (["--set", "deploymentMode=Standard", "--set", "autoscaling.minReplicas=0"], "minReplicas"),
    "canary over 100%": (["--set", "canaryTrafficPercent=150"], "canaryTrafficPercent"),
    "no GPU count": (["--set", "gpu.count=0"], "count"),
    "device": (["--set", "model.device=tpu"], "device"),
    "batch size 0": (["--set", "batching.maxBatchSize=0"], "maxBatchSize"),
    "storage URI scheme": (["--set", "model.storageUri=ftp://host/model"], "storageUri"),
    "digest": (["--set", "image.digest=latest"], "digest"),
    "duration": (["--set", "monitoring.podMonitor.interval=15"], "interval"),
    "route timeout set by hand": (["--set", "istio.virtualService.timeout=30s"], "timeout"),
    "route for every host": (["--set", "istio.virtualService.hosts={*}"], "hosts"),
    "S3 endpoint on the ServiceAccount": (["--set", "serviceAccount.annotations.serving\\.kserve\\.io/s3-endpoint=s3.example.com"],
                                          "s3-endpoint"),
    "HPA metric": (["--set", "deploymentMode=Standard", "--set", "autoscaling.standard.hpa.metric=concurrency"], "metric"),
    "HPA target": (["--set", "autoscaling.standard.hpa.target=150"], "target"),
    "Knative metric": (["--set", "autoscaling.knative.metric=cpu"], "metric"),
    "error ratio over 1": (["--set", "monitoring.prometheusRule.errorRate.threshold=5"], "threshold"),
    "unknown nested key": (["--set", "gpu.type=a100"], "type"),
    "min above max": (["--set", "autoscaling.minReplicas=5", "--set", "autoscaling.maxReplicas=2"], "minReplicas"),
    "name too long": (["--set", "fullnameOverride=" + "a" * 50], "fullnameOverride"),
    "precision": (["--set", "precision=fp8"], "precision"),
    "API keys in the values": (["--set", "auth.apiKeys.keys=secret-key"], "keys"),
    "API keys file under /tmp": (["--set", "auth.apiKeys.existingSecret=k", "--set", "auth.apiKeys.mountPath=/tmp/keys"], "mountPath"),
    "JWT without issuer": (["--set", "auth.jwt.enabled=true", "--set", "auth.jwt.jwksUri=https://x/jwks"], "issuer"),
    "JWT keys over plain HTTP": (["--set", "auth.jwt.enabled=true", "--set", "auth.jwt.issuer=x",
                                  "--set", "auth.jwt.jwksUri=http://x/jwks"], "jwksUri"),
    "JWT public path as a wildcard": (["--set", "auth.jwt.publicPaths={/v2/*}"], "publicPaths"),
    "JWT guarded paths (an allow-list now)": (["--set", "auth.jwt.paths={/classify/*}"], "paths"),
    "TLS without a certificate": (["--set", "istio.gateway.create=true", "--set", "istio.gateway.tls.enabled=true"], "credentialName"),
    "Knative timeout set by hand (derived)": (["--set", "timeout=40"], "timeout"),
    "grace period set by hand": (["--set", "terminationGracePeriodSeconds=5"], "terminationGracePeriodSeconds"),
    "negative rate limit": (["--set", "rateLimit.perMinute=-1"], "perMinute"),
    "trusted proxy hops not a number": (["--set", "rateLimit.trustedProxyHops=maybe"], "trustedProxyHops"),
    "negative trusted proxy hops": (["--set", "rateLimit.trustedProxyHops=-1"], "trustedProxyHops"),
    "queue of 0 images": (["--set", "batching.maxQueueImages=0"], "maxQueueImages"),
    "no call in flight": (["--set", "batching.maxInFlight=0"], "maxInFlight"),
    "PDB bad minAvailable": (["--set", "podDisruptionBudget.minAvailable=half"], "minAvailable"),
    "network policy: old namespace list": (["--set", "networkPolicy.allowedNamespaces={monitoring}"], "allowedNamespaces"),
    "gRPC in Knative mode (one port per revision)": (["--set", "grpc.enabled=true"], "/grpc/enabled"),
    "gRPC on the HTTP port": (["--set", "deploymentMode=Standard", "--set", "grpc.enabled=true", "--set", "grpc.port=8080"],
                              "grpc.port"),
    "gRPC on a privileged port": (["--set", "grpc.port=443"], "/grpc/port"),
    "gRPC port not a number": (["--set", "grpc.port=h2c"], "/grpc/port"),
}


@pytest.mark.parametrize("case", BAD_VALUES, ids=list(BAD_VALUES))
def test_bad_values_are_refused(case):
    args, mentioned = BAD_VALUES[case]
    result = run([tool(HELM), "template", RELEASE, CHART, "--namespace", NAMESPACE, *args], check=False)
    assert result.returncode != 0, f"helm accepted {args}"
    assert mentioned in result.stderr, result.stderr


def test_good_overrides_are_accepted():
    run([tool(HELM), "template", RELEASE, CHART, "--set", "canaryTrafficPercent=0", "--set", "model.storageUri=pvc://models/cifar10",
         "--set", "image.digest=sha256:" + "a" * 64, "--set", "autoscaling.minReplicas=0"])
    run([tool(HELM), "template", RELEASE, CHART, "--set", "deploymentMode=Standard", "--set", "podDisruptionBudget.minAvailable=50%",
         "--set", "rateLimit.trustedProxyHops=2", "--set", "precision=int8"])
    # A subchart's parent passes `global` and `enabled`; the timeout chain takes its margins.
    run([tool(HELM), "template", RELEASE, CHART, "--set", "global.foo=bar", "--set", "enabled=true",
         "--set", "timeouts.coldStartSeconds=0", "--set", "timeouts.marginSeconds=1"])


# -- what each value set promises ------------------------------------------------------------------
def isvc_of(objects):
    isvc = one(objects, "InferenceService")
    return isvc, isvc["metadata"]["annotations"], isvc["spec"]["predictor"]


def env_of(container) -> dict:
    return {e["name"]: e.get("value") for e in container["env"]}


def test_default_knative_on_a_gpu_node():
    objects = render()
    assert sorted(o["kind"] for o in objects) == ["ConfigMap", "InferenceService", "PodMonitor", "PrometheusRule",
                                                  "ServiceAccount", "VirtualService"]
    isvc, annotations, predictor = isvc_of(objects)
    container = predictor_container(objects)
    assert annotations["serving.kserve.io/deploymentMode"] == "Knative"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys() and {"cpu", "memory"} <= container["resources"]["limits"].keys()
    assert predictor["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in predictor["tolerations"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (1, 4)
    assert (predictor["scaleMetric"], predictor["scaleTarget"], predictor["containerConcurrency"]) == ("concurrency", 32, 64)
    assert predictor["timeout"] == 55 and "canaryTrafficPercent" not in predictor  # max(30 + 5, 30 + 20 + 5)
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= container.keys()
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/models/cifar10-resnet18/ready"
    assert predictor["annotations"]["prometheus.io/scrape"] == "true" and predictor["annotations"]["prometheus.io/port"] == "8080"
    assert predictor["annotations"]["serving.kserve.io/enable-prometheus-scraping"] == "false"  # KServe's webhook: hands off
    assert "STORAGE_URI" not in env_of(container)
    assert env_of(container)["MAX_BATCH_SIZE"] == "256"  # batching.maxBatchSize auto, on a GPU
    route = one(objects, "VirtualService")["spec"]
    assert route["gateways"] == ["knative-serving/knative-ingress-gateway"]
    http = route["http"][0]
    assert [m["uri"].get("exact") for m in http["match"]] == [
        "/classify/image", "/classify/batch", "/health", "/docs", "/openapi.json", "/docs/swagger-ui-bundle.js",
        "/docs/swagger-ui.css", "/docs/start.js", "/docs/favicon.png", "/v1/models/cifar10-resnet18:predict",
        "/v1/models/cifar10-resnet18:explain", "/v2/models/cifar10-resnet18/infer", "/", "/ui/app.js", "/ui/style.css",
        "/classify/jobs", None]
    job_path = re.compile(http["match"][-1]["uri"]["regex"])  # Envoy's regex match is a full match
    assert job_path.fullmatch("/classify/jobs/" + "0123456789abcdef" * 2)
    assert not any(job_path.fullmatch(p) for p in ("/classify/jobs/x", "/classify/jobs/" + "0" * 32 + "/y", "/classify/jobs/"))
    assert route["hosts"] == ["cifar10-classifier.default.example.com"]
    assert http["headers"]["request"]["set"]["Host"] == "cifar10-classifier-predictor.default.svc.cluster.local"
    assert http["route"] == [{"destination": {"host": "knative-local-gateway.istio-system.svc.cluster.local", "port": {"number": 80}}}]
    assert http["timeout"] == "35s" and http["retries"]["perTryTimeout"] == "35s"


def test_standard_mode_with_hpa_routes_to_the_predictor_service():
    objects = render(CHART / "ci" / "standard-values.yaml")
    isvc, annotations, predictor = isvc_of(objects)
    assert annotations["serving.kserve.io/deploymentMode"] == "Standard"
    assert annotations["serving.kserve.io/autoscalerClass"] == "hpa"
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("cpu", 60)
    assert not {"containerConcurrency", "timeout", "canaryTrafficPercent"} & predictor.keys()
    gateway = one(objects, "Gateway")
    route = one(objects, "VirtualService")["spec"]
    assert route["gateways"] == [f"{NAMESPACE}/{gateway['metadata']['name']}"]
    assert "headers" not in route["http"][0]
    assert route["http"][0]["route"][0]["destination"] == {"host": "cifar10-classifier-predictor.default.svc.cluster.local",
                                                           "port": {"number": 80}}


def test_standard_mode_with_keda_scales_on_the_request_rate():
    objects = render(CHART / "ci" / "standard-keda-values.yaml")
    _, annotations, predictor = isvc_of(objects)
    assert annotations["serving.kserve.io/autoscalerClass"] == "keda" and "scaleMetric" not in predictor
    (metric,) = predictor["autoScaling"]["metrics"]
    assert metric["type"] == "External" and metric["external"]["metric"]["backend"] == "prometheus"
    assert 'job="cifar10-classifier"' in metric["external"]["metric"]["query"]
    assert metric["external"]["target"] == {"type": "Value", "value": "50"}
    policy = one(objects, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": "cifar10-classifier"}


def test_cpu_only_has_no_gpu_and_may_scale_to_zero():
    objects = render(CHART / "ci" / "cpu-values.yaml")
    text = json.dumps(objects)
    assert "nvidia.com/gpu" not in text
    _, _, predictor = isvc_of(objects)
    assert "nodeSelector" not in predictor and "tolerations" not in predictor
    assert predictor["minReplicas"] == 0 and predictor["scaleMetric"] == "rps"
    assert env_of(predictor_container(objects))["DEVICE"] == "cpu"
    alerts = [r["alert"] for r in one(objects, "PrometheusRule")["spec"]["groups"][0]["rules"]]
    assert "Cifar10ClassifierNoReadyReplicas" not in alerts  # zero replicas is normal when scaled to zero


def test_canary_splits_traffic_for_a_new_model_version():
    objects = render(CHART / "ci" / "canary-values.yaml")
    _, _, predictor = isvc_of(objects)
    container = predictor_container(objects)
    assert predictor["canaryTrafficPercent"] == 10
    assert container["image"] == "ghcr.io/example/cifar10-kserve-predictor:1.1.0-cuda"
    assert env_of(container)["STORAGE_URI"] == "s3://models/cifar10-resnet18/v2"
    assert one(objects, "ServiceAccount")["secrets"] == [{"name": "s3-model-credentials"}]


def test_monitoring_off_renders_only_the_inference_service():
    objects = render(CHART / "ci" / "monitoring-off-values.yaml")
    assert [o["kind"] for o in objects] == ["InferenceService"]
    _, annotations, predictor = isvc_of(objects)
    assert "prometheus.io/scrape" not in predictor.get("annotations", {})
    assert "serving.kserve.io/enable-prometheus-scraping" not in annotations
    assert predictor["serviceAccountName"] == "default"


# -- hardening (issue 6): pod security, drain, API keys, JWT, network policy, PDB, TLS ---------------------
def env_of_values(values_file):
    return env_of(predictor_container(render(values_file)))


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_the_pod_runs_restricted_with_a_writable_tmp_only(values_file):
    objects = render(values_file)
    _, annotations, predictor = isvc_of(objects)
    container = predictor_container(objects)
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]} and security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not security.get("privileged")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in predictor["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "the read-only root needs an emptyDir at /tmp"
    assert all(m.get("readOnly") for path, m in mounts.items() if path != "/tmp"), "only /tmp may be writable"
    # torch.compile's cache goes to the writable /tmp, not to the read-only home of the image.
    assert env_of(container)["TORCHINDUCTOR_CACHE_DIR"].startswith("/tmp/")
    if annotations["serving.kserve.io/deploymentMode"] == "Standard":
        pod = predictor["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["seccompProfile"] == {"type": "RuntimeDefault"}


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_the_grace_period_covers_the_prestop_sleep_and_the_drain(values_file):
    objects = render(values_file)
    _, annotations, predictor = isvc_of(objects)
    container = predictor_container(objects)
    drain = int(env_of(container)["DRAIN_TIMEOUT_S"])
    assert drain == values_of(values_file)["shutdown"]["drainTimeoutSeconds"]
    if annotations["serving.kserve.io/deploymentMode"] == "Standard":
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep" and len(command) == 2  # /bin/sleep of the Debian base (test_deploy_image)
        sleep = int(command[1])
        assert sleep >= 1, "endpoints need a moment to drop the pod before SIGTERM"
        assert predictor["terminationGracePeriodSeconds"] >= sleep + drain + 1
    else:
        # Knative: its own preStop drains the queue-proxy (30 s), the grace period is the revision timeout.
        assert "lifecycle" not in container
        assert predictor["timeout"] >= 30 + drain + 1


def test_the_grace_period_follows_the_drain_setting():
    sets = ("deploymentMode=Standard", "istio.gateway.create=true", "shutdown.drainTimeoutSeconds=50",
            "shutdown.preStopSleepSeconds=7", "shutdown.marginSeconds=3")
    objects = render(sets=sets)
    assert isvc_of(objects)[2]["terminationGracePeriodSeconds"] == 60
    assert predictor_container(objects)["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "7"]
    no_sleep = predictor_container(render(sets=(*sets, "shutdown.preStopSleepSeconds=0")))
    assert "lifecycle" not in no_sleep


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_every_new_setting_reaches_the_predictor_env(values_file):
    values = values_of(values_file)
    env = env_of_values(values_file)
    assert env["PRECISION"] == values["precision"]
    assert env["MAX_QUEUE_IMAGES"] == str(values["batching"]["maxQueueImages"])
    assert env["MAX_IN_FLIGHT"] == str(values["batching"]["maxInFlight"])
    assert float(env["REQUEST_TIMEOUT_S"]) == values["limits"]["requestTimeoutSeconds"]
    assert env["RATE_LIMIT_PER_MINUTE"] == str(values["rateLimit"]["perMinute"])
    assert "API_KEYS" not in env, "keys never go into the pod spec in plain text"
    hops = values["rateLimit"]["trustedProxyHops"]
    istio_in_front = values["istio"]["virtualService"]["enabled"] or values["istio"]["gateway"]["create"]
    auto = (4 if values["deploymentMode"] == "Knative" else 1) if istio_in_front else 0
    assert env["TRUSTED_PROXY_HOPS"] == str(auto if hops == "auto" else hops)
    assert "TRUST_FORWARDED_FOR" not in env  # replaced; the predictor refuses to start with it


def test_trusted_proxy_hops_follow_the_istio_route_and_the_mode():
    """Behind the chart's route: Standard mode 1 (the ingress gateway appends the client), Knative mode
    4 (ingress gateway, knative-local-gateway, activator, queue-proxy); no route: 0, the peer counts."""
    assert env_of_values(None)["TRUSTED_PROXY_HOPS"] == "4"
    assert env_of_values(CHART / "ci" / "standard-values.yaml")["TRUSTED_PROXY_HOPS"] == "1"
    assert env_of_values(CHART / "ci" / "monitoring-off-values.yaml")["TRUSTED_PROXY_HOPS"] == "0"  # no route
    assert env_of_values(CHART / "ci" / "secure-knative-values.yaml")["TRUSTED_PROXY_HOPS"] == "0"  # set by hand
    standard_by_hand = env_of(predictor_container(render(sets=("deploymentMode=Standard", "rateLimit.trustedProxyHops=2"))))
    assert standard_by_hand["TRUSTED_PROXY_HOPS"] == "2"


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_the_api_keys_secret_is_mounted_read_only_and_api_keys_file_points_into_it(values_file):
    objects = render(values_file)
    _, _, predictor = isvc_of(objects)
    container = predictor_container(objects)
    env = env_of(container)
    keys = values_of(values_file)["auth"]["apiKeys"]
    secret_volumes = [v for v in predictor["volumes"] if "secret" in v]
    if not keys["existingSecret"]:
        assert "API_KEYS_FILE" not in env and not secret_volumes
        return
    (volume,) = secret_volumes
    assert volume["secret"]["secretName"] == keys["existingSecret"]
    (item,) = volume["secret"]["items"]
    assert item["key"] == keys["secretKey"]
    assert volume["secret"]["defaultMode"] & 0o222 == 0 and volume["secret"]["defaultMode"] & 0o004  # read-only, readable by uid 10001
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True and "subPath" not in mount  # no subPath: the kubelet updates rotated keys
    assert env["API_KEYS_FILE"] == f"{mount['mountPath'].rstrip('/')}/{item['path']}"
    assert not env["API_KEYS_FILE"].startswith("/tmp/")


@pytest.mark.parametrize("redis", [("redis.url=redis://redis:6379/0",), ("redis.existingSecret=cifar10-redis",), ()],
                         ids=["redis-url", "redis-secret", "no-redis"])
def test_with_redis_the_key_id_secret_is_mounted_from_the_api_keys_secret_and_required(redis):
    """The secret naming API keys in Redis (HMAC-SHA256) comes from the keys' Secret as a file beside
    the keys, never in the spec; with Redis the item is required (no `optional`: the pod does not start
    without it); without Redis, or without keys, it is not mounted (each process draws its own)."""
    assert "KEY_ID_SECRET_FILE" not in env_of(predictor_container(render(sets=redis)))  # no keys: nothing to name
    objects = render(sets=("auth.apiKeys.existingSecret=cifar10-keys", *redis))
    _, _, predictor = isvc_of(objects)
    env = env_of(predictor_container(objects))
    assert "KEY_ID_SECRET" not in env
    (volume,) = [v for v in predictor["volumes"] if "secret" in v]
    items = {item["key"]: item["path"] for item in volume["secret"]["items"]}
    if not redis:
        assert "KEY_ID_SECRET_FILE" not in env and items == {"keys": "keys"}
        return
    assert items == {"keys": "keys", "key-id-secret": "key-id-secret"} and not volume["secret"].get("optional")
    assert env["KEY_ID_SECRET_FILE"] == env["API_KEYS_FILE"].rsplit("/", 1)[0] + "/key-id-secret"
    with pytest.raises(Exception, match="keyIdSecretKey must differ"):
        render(sets=("auth.apiKeys.existingSecret=cifar10-keys", "auth.apiKeys.keyIdSecretKey=keys", *redis))


def test_the_connection_limits_reach_the_predictor_env():
    env = env_of(predictor_container(render(sets=("limits.headerTimeoutSeconds=3", "limits.maxHeaderBytes=16384",
                                                  "limits.maxConnections=500"))))
    assert (env["HEADER_TIMEOUT_S"], env["MAX_HEADER_BYTES"], env["MAX_CONNECTIONS"]) == ("3", "16384", "500")
    with pytest.raises(Exception, match="maxConnections"):
        render(sets=("limits.maxConnections=0",))


@pytest.mark.parametrize("values_file", [v for v in CI_VALUES if values_of(v)["auth"]["jwt"]["enabled"]],
                         ids=lambda v: v.name.removesuffix("-values.yaml"))
def test_the_jwt_rules_and_selectors(values_file):
    """Which tokens count, and that both policies select the predictor pods (as the PodMonitor does).
    What the policy lets through is evaluated in test_deploy_cluster.py."""
    objects = render(values_file)
    values = values_of(values_file)
    authn, policy = one(objects, "RequestAuthentication"), one(objects, "AuthorizationPolicy")
    (rule,) = authn["spec"]["jwtRules"]
    assert rule["issuer"] == values["auth"]["jwt"]["issuer"] and rule["jwksUri"].startswith("https://")
    assert rule.get("audiences", []) == values["auth"]["jwt"]["audiences"]
    assert policy["spec"]["action"] == "ALLOW"
    pods = one(objects, "PodMonitor")["spec"]["selector"]["matchLabels"]
    assert authn["spec"]["selector"]["matchLabels"] == policy["spec"]["selector"]["matchLabels"] == pods


def test_the_files_docs_loads_are_routed_and_public_wherever_docs_is():
    """/docs loads Swagger UI from the predictor itself (predictor.serving.docs.ASSETS): the route and the
    JWT allow-list carry those files wherever they carry /docs, or the page is blank through the ingress."""
    from predictor.serving.docs import ASSETS

    assets = {f"/docs/{name}" for name in ASSETS}
    objects = render(CHART / "ci" / "secure-standard-values.yaml")
    routed = {m["uri"].get("exact") for http in one(objects, "VirtualService")["spec"]["http"] for m in http["match"]}
    public = {p for rule in one(objects, "AuthorizationPolicy")["spec"]["rules"] for op in rule.get("to", [])
              for p in op["operation"].get("paths", []) if set(op["operation"].get("methods", [])) <= {"GET", "HEAD"}}
    assert "/docs" in routed and assets <= routed, routed
    assert "/docs" in public and assets <= public, public
    without = render(CHART / "ci" / "secure-standard-values.yaml", sets=("istio.virtualService.paths={/classify/image}",
                                                                          "auth.jwt.publicPaths={/health}"))
    routed = {m["uri"].get("exact") for http in one(without, "VirtualService")["spec"]["http"] for m in http["match"]}
    public = {p for rule in one(without, "AuthorizationPolicy")["spec"]["rules"] for op in rule.get("to", [])
              for p in op["operation"].get("paths", [])}
    assert not assets & routed and not assets & public


JWT_ONLY = ("auth.jwt.enabled=true", "auth.jwt.issuer=https://issuer.example", "auth.jwt.jwksUri=https://issuer.example/jwks")


@pytest.mark.parametrize("mode", ["Knative", "Standard"])
def test_with_jwt_the_token_subject_owns_jobs_and_a_network_policy_is_on(mode):
    """Istio copies the verified token's `sub` to a header the predictor reads as the job owner; the
    route strips a client's own copy. With the token as the only auth, the NetworkPolicy is on."""
    objects = render(sets=(*JWT_ONLY, f"deploymentMode={mode}"))
    (rule,) = one(objects, "RequestAuthentication")["spec"]["jwtRules"]
    assert rule["outputClaimToHeaders"] == [{"header": "x-jwt-subject", "claim": "sub"}]
    assert env_of(predictor_container(objects))["JOB_OWNER_HEADER"] == "x-jwt-subject"
    assert one(objects, "VirtualService")["spec"]["http"][0]["headers"]["request"]["remove"] == ["x-jwt-subject"]
    assert by_kind(objects, "NetworkPolicy")
    with_keys = render(sets=(*JWT_ONLY, f"deploymentMode={mode}", "auth.apiKeys.existingSecret=keys"))
    assert not by_kind(with_keys, "NetworkPolicy")  # the keys are checked by the predictor itself
    unowned = render(sets=(*JWT_ONLY, f"deploymentMode={mode}", "auth.jwt.ownerClaim="))
    assert "JOB_OWNER_HEADER" not in env_of(predictor_container(unowned))
    assert "outputClaimToHeaders" not in one(unowned, "RequestAuthentication")["spec"]["jwtRules"][0]


def test_no_jwt_policy_by_default():
    objects = render()
    assert not by_kind(objects, "RequestAuthentication") and not by_kind(objects, "AuthorizationPolicy")


def ports_of(rule: dict) -> set[int]:
    return {p["port"] for p in rule["ports"]}


@pytest.mark.parametrize("values_file", [v for v in CI_VALUES if values_of(v)["networkPolicy"]["enabled"]],
                         ids=lambda v: v.name.removesuffix("-values.yaml"))
def test_the_network_policy_admits_only_the_gateway_prometheus_and_knative(values_file):
    objects = render(values_file)
    values = values_of(values_file)
    np = values["networkPolicy"]
    _, annotations, _ = isvc_of(objects)
    knative = annotations["serving.kserve.io/deploymentMode"] == "Knative"
    spec = one(objects, "NetworkPolicy")["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    container_port = predictor_container(objects)["ports"][0]["containerPort"]
    rules = spec["ingress"]
    for rule in rules:
        assert rule.get("ports"), "every rule names its ports"
        for peer in rule["from"]:
            # No peer admits a whole namespace's or the whole cluster's pods unless configured so.
            assert peer in np["extraFrom"] or ("namespaceSelector" in peer and "podSelector" in peer), peer

    def rule_for(peer):
        (found,) = [r for r in rules if {"namespaceSelector": peer["namespaceSelector"], "podSelector": peer["podSelector"]} in r["from"]]
        return found

    gateway, prometheus = rule_for(np["ingressGateway"]), rule_for(np["prometheus"])
    # Prometheus reaches the PodMonitor's port (the container port) and nothing else.
    (endpoint,) = one(objects, "PodMonitor")["spec"]["podMetricsEndpoints"]
    pod = kserve_pod(objects)  # the pod the cluster makes: Knative renames the port
    assert [p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])
            if p["name"] == endpoint["port"]] == [container_port]
    assert ports_of(prometheus) == {container_port}
    if knative:
        # Requests reach the pod on the queue-proxy's ports, from the gateway or the activator.
        assert 8012 in ports_of(gateway) and container_port not in ports_of(gateway)
        activator = rule_for(np["knative"])
        assert {8012, 9090} <= ports_of(activator)
        assert len(rules) == 3
    else:
        assert ports_of(gateway) == {container_port}
        assert len(rules) == 2
    for extra in np["extraFrom"]:
        assert extra in gateway["from"]


def test_the_network_policy_is_opt_in():
    assert not by_kind(render(), "NetworkPolicy")


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_a_pod_disruption_budget_guards_standard_mode_only(values_file):
    objects = render(values_file)
    values = values_of(values_file)
    _, annotations, predictor = isvc_of(objects)
    budgets = by_kind(objects, "PodDisruptionBudget")
    if annotations["serving.kserve.io/deploymentMode"] == "Knative" or not values["podDisruptionBudget"]["enabled"]:
        assert not budgets
        return
    (pdb,) = budgets
    spec = pdb["spec"]
    # It selects the pods KServe creates (the labels the PodMonitor selects on).
    assert spec["selector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": isvc_of(objects)[0]["metadata"]["name"],
                                               "component": "predictor"}
    assert ("minAvailable" in spec) != ("maxUnavailable" in spec)
    if "minAvailable" in spec:
        # A drain must stay possible: fewer pods required than the fewest replicas.
        assert spec["minAvailable"] == values["podDisruptionBudget"]["minAvailable"] < predictor["minReplicas"]
    else:
        assert spec["maxUnavailable"] == values["podDisruptionBudget"]["maxUnavailable"] >= 1


def test_tls_at_the_gateway_serves_https_and_redirects_http():
    objects = render(CHART / "ci" / "secure-standard-values.yaml")
    gateway = one(objects, "Gateway")
    servers = {s["port"]["protocol"]: s for s in gateway["spec"]["servers"]}
    assert servers.keys() == {"HTTPS", "HTTP"}
    https = servers["HTTPS"]
    assert https["port"]["number"] == 443 and https["hosts"] == ["cifar10.example.com"]
    assert https["tls"] == {"mode": "SIMPLE", "credentialName": "cifar10-example-com-tls", "minProtocolVersion": "TLSV1_2"}
    assert servers["HTTP"]["tls"] == {"httpsRedirect": True}
    route = one(objects, "VirtualService")["spec"]
    assert route["gateways"] == [f"{NAMESPACE}/{gateway['metadata']['name']}"] and route["hosts"] == ["cifar10.example.com"]
    # Without the redirect, HTTPS only; without TLS, HTTP only.
    https_only = render(CHART / "ci" / "secure-standard-values.yaml", sets=("istio.gateway.tls.httpsRedirect=false",))
    assert [s["port"]["protocol"] for s in one(https_only, "Gateway")["spec"]["servers"]] == ["HTTPS"]
    plain = one(render(CHART / "ci" / "standard-values.yaml"), "Gateway")["spec"]["servers"]
    assert [s["port"]["protocol"] for s in plain] == ["HTTP"] and "tls" not in plain[0]


# -- gRPC through the ingress (hardening point 10) -------------------------------------------------------
# The RPCs of the Open Inference Protocol's GRPCInferenceService the route carries: inference, metadata and
# readiness; not the model repository's (RepositoryModelLoad/Unload answer UNIMPLEMENTED anyway).
GRPC_RPCS = ("ModelInfer", "ModelMetadata", "ModelReady", "ServerLive", "ServerMetadata", "ServerReady")
GRPC = ("grpc.enabled=true",)
STANDARD_SETS = [CHART / "ci" / "standard-values.yaml", CHART / "ci" / "secure-standard-values.yaml"]


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_grpc_is_off_by_default(values_file):
    """Off, the pod serves HTTP only, on one port, and the route carries HTTP only (manifests/ unchanged)."""
    assert values_of(values_file)["grpc"] == {"enabled": False, "port": 8081}
    objects = render(values_file)
    container = predictor_container(objects)
    assert "--enable_grpc=false" in container["args"] and not any(a.startswith("--grpc_port") for a in container["args"])
    assert [p["name"] for p in container["ports"]] == ["http1"]
    for route in by_kind(objects, "VirtualService"):
        assert [r["name"] for r in route["spec"]["http"]] == ["classify"]


@pytest.mark.parametrize("values_file", STANDARD_SETS, ids=["standard", "secure-standard"])
def test_grpc_through_the_ingress_in_standard_mode(values_file):
    """grpc.enabled: the predictor serves gRPC on its own port, declared on the pod (so KServe's
    `<name>-predictor` Service carries it, under a name that makes Istio speak HTTP/2 to it, with or
    without the appProtocol newer KServe adds), and the chart's route sends the RPCs there, on the same
    gateway and host, with the HTTP route's timeout, retries and header rules. Every object validates."""
    objects = render(values_file, sets=GRPC)
    for obj in objects:
        validate_object(obj)
    container = predictor_container(objects)
    assert "--enable_grpc=true" in container["args"] and "--grpc_port=8081" in container["args"]
    assert "--enable_grpc=false" not in container["args"]
    http_port, grpc_port = container["ports"]
    # The HTTP port stays first: KServe's Service maps port 80 to it, the PodMonitor and probes name it.
    assert http_port == {"name": "http1", "containerPort": 8080, "protocol": "TCP"}
    assert grpc_port == {"name": "grpc", "containerPort": 8081, "protocol": "TCP"}
    assert one(objects, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["port"] == "http1"
    service = kserve_predictor_service(objects)
    route = one(objects, "VirtualService")["spec"]
    classify, grpc = route["http"]
    assert (classify["name"], grpc["name"]) == ("classify", "grpc")
    assert [m["uri"] for m in grpc["match"]] == [{"exact": f"/inference.GRPCInferenceService/{rpc}"} for rpc in GRPC_RPCS]
    (destination,) = [r["destination"] for r in grpc["route"]]
    assert destination["host"] == classify["route"][0]["destination"]["host"] == "cifar10-classifier-predictor.default.svc.cluster.local"

    def service_port(number):
        (found,) = [p for p in service["spec"]["ports"] if p["port"] == number]
        return found

    assert service_port(classify["route"][0]["destination"]["port"]["number"])["targetPort"] == 8080
    grpc_service_port = service_port(destination["port"]["number"])
    assert grpc_service_port["targetPort"] == 8081
    older_kserve = {k: v for k, v in grpc_service_port.items() if k != "appProtocol"}
    assert istio_port_protocol(grpc_service_port) == istio_port_protocol(older_kserve) == "HTTP2", grpc_service_port
    assert grpc["timeout"] == classify["timeout"] and grpc["retries"] == classify["retries"]
    assert grpc.get("headers") == classify.get("headers")  # no Host rewrite in Standard mode; the JWT owner header stripped
    values = values_of(values_file)
    if values["networkPolicy"]["enabled"]:
        rules = one(objects, "NetworkPolicy")["spec"]["ingress"]
        gateway_rule, prometheus_rule = rules
        assert ports_of(gateway_rule) == {8080, 8081} and ports_of(prometheus_rule) == {8080}
    if values["auth"]["jwt"]["enabled"]:
        # An RPC is a POST: the allow-list's public GET/HEAD paths never cover one, a call needs a token.
        public = [op["operation"] for rule in one(objects, "AuthorizationPolicy")["spec"]["rules"] for op in rule.get("to", [])]
        assert all(set(op.get("methods", [])) <= {"GET", "HEAD"} for op in public)
        assert not any(p.startswith("/inference.") for op in public for p in op.get("paths", []))
    apis = ["--set", "extraAPIVersions={" + ",".join(OPTIONAL_APIS) + "}"]
    lint = run([tool(HELM), "lint", "--strict", CHART, "--namespace", NAMESPACE, "--values", values_file, "--set", GRPC[0], *apis])
    assert not re.search(r"\[(WARNING|ERROR)\]|\[INFO\] Fail", lint.stdout + lint.stderr), lint.stdout


@pytest.mark.parametrize("how", ["route off", "no Istio API"])
def test_grpc_without_the_route_still_opens_the_port_in_the_cluster(how):
    """The route is an optional CR like the HTTP one (gated on the cluster serving Istio's API); the
    pod's port and KServe's Service do not depend on it."""
    sets = (*GRPC, "grpc.port=9000")
    if how == "route off":
        objects = render(CHART / "ci" / "standard-values.yaml", sets=(*sets, "istio.virtualService.enabled=false"))
    else:
        objects = render(CHART / "ci" / "standard-values.yaml", sets=sets, api_versions=())
    assert not by_kind(objects, "VirtualService")
    assert predictor_container(objects)["ports"][1] == {"name": "grpc", "containerPort": 9000, "protocol": "TCP"}
    assert "--grpc_port=9000" in predictor_container(objects)["args"]
    assert [p["port"] for p in kserve_predictor_service(objects)["spec"]["ports"]] == [80, 9000]


def test_grpc_is_refused_in_knative_mode():
    """A Knative revision has one port (knative/serving validateContainersPorts), the HTTP API's, and
    queue-proxy sends its readiness probe to that port: the schema refuses grpc.enabled there, and past
    the schema (--skip-schema-validation) the chart's own check says why."""
    for mode_sets in ((), ("--set", "deploymentMode=Knative")):
        result = run([tool(HELM), "template", RELEASE, CHART, *mode_sets, "--set", GRPC[0]], check=False)
        assert result.returncode != 0 and "/grpc/enabled" in result.stderr, result.stderr
    result = run([tool(HELM), "template", RELEASE, CHART, "--set", GRPC[0], "--skip-schema-validation"], check=False)
    assert result.returncode != 0 and "deploymentMode=Standard" in result.stderr and "one port" in result.stderr, result.stderr


def test_notes_print_a_tritonclient_call_for_grpc():
    plain = render_notes(CHART / "ci" / "standard-values.yaml", sets=GRPC)
    assert "tritonclient.grpc" in plain and "'${INGRESS_HOST}:80'" in plain
    assert "('grpc.default_authority', 'cifar10-classifier.default.example.com')" in plain
    tls = render_notes(CHART / "ci" / "secure-standard-values.yaml", sets=GRPC)
    assert "'${INGRESS_HOST}:443', ssl=True" in tls and "('grpc.ssl_target_name_override', 'cifar10.example.com')" in tls
    # The key and the token go as metadata, like the curl's headers.
    assert "'x-api-key': '${API_KEY}'" in tls and "'authorization': 'Bearer ${TOKEN}'" in tls
    assert "'x-api-key'" not in plain and "authorization" not in plain
    # In the cluster, and without the route: KServe's Service on the gRPC port.
    assert "cifar10-classifier-predictor.default.svc.cluster.local:8081" in plain
    assert "tritonclient" not in render_notes(CHART / "ci" / "standard-values.yaml")


# -- admission rules of KServe's and Knative's webhooks, which no schema carries ----------------------
# Knative's field masks (knative.dev/serving pkg/apis/serving/fieldmask.go) with its default
# features, plus the fields our chart may add behind the features named in the README.
KNATIVE_POD_FIELDS = {"serviceAccountName", "containers", "volumes", "imagePullSecrets", "enableServiceLinks",
                      "automountServiceAccountToken", "nodeSelector", "tolerations", "affinity", "priorityClassName"}
KNATIVE_CONTAINER_FIELDS = {"name", "args", "command", "env", "workingDir", "envFrom", "image", "imagePullPolicy",
                            "livenessProbe", "readinessProbe", "startupProbe", "ports", "resources", "securityContext",
                            "terminationMessagePath", "terminationMessagePolicy", "volumeMounts"}
KNATIVE_CONTAINER_SECURITY = {"capabilities", "readOnlyRootFilesystem", "runAsUser", "runAsGroup", "runAsNonRoot",
                              "allowPrivilegeEscalation", "seccompProfile"}
ISVC_ONLY_FIELDS = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "containerConcurrency", "timeout",
                    "canaryTrafficPercent", "labels", "annotations", "autoScaling", "deploymentStrategy"}


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_kserve_and_knative_admission_rules(values_file):
    objects = render(values_file)
    isvc, annotations, predictor = isvc_of(objects)
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", isvc["metadata"]["name"]) and len(isvc["metadata"]["name"]) <= 45
    mode = annotations["serving.kserve.io/deploymentMode"]
    container = predictor_container(objects)
    port = container["ports"][0]["containerPort"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if probe in container:
            assert container[probe]["httpGet"]["port"] == port, f"{probe} must target the container port"
    if mode == "Knative":
        assert predictor.get("scaleMetric", "concurrency") in ("concurrency", "rps")
        assert "deploymentStrategy" not in predictor and "serving.kserve.io/autoscalerClass" not in annotations
        assert len(container["ports"]) == 1 and container["ports"][0]["name"] in ("http1", "h2c")
        pod_fields = predictor.keys() - ISVC_ONLY_FIELDS - {"securityContext"}
        assert pod_fields <= KNATIVE_POD_FIELDS, f"Knative refuses {pod_fields - KNATIVE_POD_FIELDS}"
        assert predictor.get("automountServiceAccountToken", False) is False  # Knative accepts only false
        assert not predictor.get("securityContext"), "Knative refuses pod-level securityContext by default"
        assert container.keys() <= KNATIVE_CONTAINER_FIELDS, container.keys() - KNATIVE_CONTAINER_FIELDS
        assert container.get("securityContext", {}).keys() <= KNATIVE_CONTAINER_SECURITY
        assert not container["securityContext"].get("capabilities", {}).get("add")
    else:
        assert mode == "Standard" and "canaryTrafficPercent" not in predictor
        autoscaler = annotations["serving.kserve.io/autoscalerClass"]
        if autoscaler == "hpa":
            assert predictor["scaleMetric"] in ("cpu", "memory")
            assert predictor["scaleMetric"] != "cpu" or 1 <= predictor["scaleTarget"] <= 100
        else:
            assert autoscaler == "keda" and "scaleMetric" not in predictor
            for metric in predictor["autoScaling"]["metrics"]:
                assert metric["external"]["metric"]["query"] and metric["external"]["target"]["value"]
        assert predictor["minReplicas"] >= 1
    assert predictor["minReplicas"] <= predictor["maxReplicas"]


# -- NOTES.txt --------------------------------------------------------------------------------------
def test_notes_warn_when_in_cluster_callers_can_pick_their_rate_limit_bucket():
    """Trusted proxy hops, no API keys and no NetworkPolicy: a pod past the gateway writes its own
    X-Forwarded-For. The notes say so, and stop saying so once either is on."""
    warning = "picks its own bucket"
    assert warning in render_notes(CHART / "ci" / "standard-values.yaml")
    assert warning not in render_notes(CHART / "ci" / "standard-values.yaml", sets=("networkPolicy.enabled=true",))
    assert warning not in render_notes(CHART / "ci" / "standard-values.yaml", sets=("auth.apiKeys.existingSecret=keys",))
    assert warning not in render_notes(sets=("rateLimit.trustedProxyHops=0",))


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_notes_print_a_curl_command_for_the_route(values_file):
    notes = render_notes(values_file)
    curls = [line.strip() for line in notes.splitlines() if line.strip().startswith("curl ")]
    assert curls and all('-F "file=@' in c and c.endswith('/classify/image"') for c in curls), notes
    values = values_of(values_file)
    if values["istio"]["virtualService"]["enabled"]:
        assert "${INGRESS_HOST}" in curls[0]
        host = one(render(values_file), "VirtualService")["spec"]["hosts"][0]  # the route's, as rendered
        gateway = values["istio"]["gateway"]
        if gateway["create"] and gateway["tls"]["enabled"]:
            # HTTPS: the host name must be in the URL (SNI, certificate), resolved to the gateway.
            assert "http://" not in curls[0] and "https://" in curls[0]
            assert f'--resolve "{host}:{gateway["tls"]["port"]}:${{INGRESS_HOST}}"' in curls[0]
        else:
            assert f'-H "Host: {host}"' in curls[0]
    else:
        assert "${ISVC_URL}" in curls[0] and "{.status.url}" in notes
    if values["canaryTrafficPercent"] is not None:
        assert f"{values['canaryTrafficPercent']}%" in notes
    # With API keys every curl sends one (the port-forward one too: the predictor checks it), and
    # the notes say how to read it from the Secret; with JWT the mesh routes send a token.
    keys = values["auth"]["apiKeys"]
    assert all(('-H "X-API-Key: ${API_KEY}"' in c) == bool(keys["existingSecret"]) for c in curls), curls
    if keys["existingSecret"]:
        assert f"kubectl get secret {keys['existingSecret']}" in notes
    assert ('-H "Authorization: Bearer ${TOKEN}"' in curls[0]) == values["auth"]["jwt"]["enabled"]
    assert all("Authorization" not in c for c in curls if "127.0.0.1" in c)  # port-forward skips the sidecar


# -- every value is documented -------------------------------------------------------------------------
def documented_params() -> dict[str, str]:
    found = re.findall(r"^\s*## @param (\S+) (.+)$", (CHART / "values.yaml").read_text(), re.M)
    return dict(found)


def test_every_value_is_documented_and_every_doc_is_a_value():
    params = documented_params()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    undocumented = []

    def walk(node, path):
        if path in params:
            return
        if isinstance(node, dict) and node:
            for key, child in node.items():
                walk(child, f"{path}.{key}" if path else key)
        else:
            undocumented.append(path)

    walk(values, "")
    assert not undocumented, f"values without a `## @param` line: {undocumented}"

    def exists(path):
        node = values
        for key in path.split("."):
            if not isinstance(node, dict) or key not in node:
                return False
            node = node[key]
        return True

    assert all(exists(p) for p in params), [p for p in params if not exists(p)]
    schema = json.loads((CHART / "values.schema.json").read_text())
    # `global` and `enabled` are a parent chart's, accepted so the chart can be a subchart.
    assert set(values) | {"global", "enabled"} == set(schema["properties"]), set(values) ^ set(schema["properties"])


def test_the_readme_values_table_lists_every_value():
    table = (ROOT / "helm" / "README.md").read_text().split("\n## Values\n")[1]
    rows = set(re.findall(r"^\| `([^`]+)` \|", table, re.M))
    assert rows == set(documented_params()), set(documented_params()) ^ rows


# -- checkov -------------------------------------------------------------------------------------------
# Checks skipped, each with its reason.
CHECKOV_SKIPS = {
    "CKV_K8S_21": "checkov renders the chart without a namespace; the chart installs into the release namespace "
                  "(helm install -n), and manifests/ target `default` so that `kubectl apply -k` works on any cluster",
    "CKV_K8S_43": "the image is built from this repository and has no registry digest before it is pushed; "
                  "image.digest pins it per release",
    "CKV_K8S_15": "IfNotPresent with an immutable version tag (or image.digest): Always would pull the multi-GB CUDA "
                  "image again on every scale-up, the slow path of scale-from-zero",
}
# Knative mode only: Standard mode sets the pod-level securityContext too.
KNATIVE_POD_SECURITY_SKIP = ("CKV_K8S_29", "every setting is on the container's securityContext (non-root uid, no escalation, "
                                           "no capabilities, read-only root, seccomp RuntimeDefault); Knative refuses "
                                           "pod-level securityContext fields by default")
NETWORK_POLICY_SKIP = ("CKV2_K8S_6", "the NetworkPolicy is opt-in (networkPolicy.enabled): which namespaces may call the "
                                     "predictor depends on the cluster's mesh and monitoring")


def checkov(directory: Path, framework: str, skips: dict[str, str]) -> dict:
    args = [tool(CHECKOV), "--quiet", "--compact", "--skip-download", "--output", "json", "--framework", framework,
            "--directory", directory]
    if skips:
        args += ["--skip-check", ",".join(skips)]
    # checkov renders a chart with the `helm` it finds on PATH: ours.
    result = run(args, check=False, timeout=300, env={**os.environ, "PATH": f"{HELM.parent}:{os.environ['PATH']}"})
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [(c["check_id"], c["check_name"], c.get("resource")) for r in reports for c in r["results"]["failed_checks"]]
    passed = sum(r["summary"]["passed"] for r in reports)
    return {"failed": failed, "passed": passed}


def test_checkov_passes_on_the_chart():
    result = checkov(CHART, "helm", {"CKV_K8S_21": CHECKOV_SKIPS["CKV_K8S_21"]})
    assert not result["failed"], result["failed"]
    assert result["passed"] >= 1


@pytest.mark.parametrize("values_file", [CHART / "ci" / "secure-standard-values.yaml", CHART / "ci" / "secure-knative-values.yaml"],
                         ids=["secure-standard", "secure-knative"])
def test_checkov_passes_on_the_hardened_objects(values_file):
    """Everything the hardened value sets render (NetworkPolicy, PodDisruptionBudget, Gateway with
    TLS, the Istio security policies), through checkov's Kubernetes checks."""
    objects = render(values_file)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "objects.yaml").write_text(yaml.safe_dump_all(objects))
        result = checkov(Path(tmp), "kubernetes", {"CKV_K8S_21": CHECKOV_SKIPS["CKV_K8S_21"]})
    assert not result["failed"], result["failed"]


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_checkov_passes_on_the_pod_kserve_creates(values_file):
    """checkov has no checks for an InferenceService: give it the Deployment KServe makes of the
    predictor spec (with the chart's NetworkPolicy, if any), after validating that too."""
    objects = render(values_file)
    isvc, _, predictor = isvc_of(objects)
    name = isvc["metadata"]["name"]
    labels = {**predictor["labels"], "serving.kserve.io/inferenceservice": name, "component": "predictor"}
    pod_spec = {k: v for k, v in predictor.items() if k not in ISVC_ONLY_FIELDS}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment",
                  "metadata": {"name": f"{name}-predictor", "namespace": NAMESPACE, "labels": labels},
                  "spec": {"selector": {"matchLabels": labels},
                           "template": {"metadata": {"labels": labels, "annotations": predictor.get("annotations", {})},
                                        "spec": pod_spec}}}
    assert validate_object(deployment).startswith("kubernetes-validate")
    skips = dict(CHECKOV_SKIPS)
    policies = by_kind(objects, "NetworkPolicy")
    if not policies:
        skips[NETWORK_POLICY_SKIP[0]] = NETWORK_POLICY_SKIP[1]
    if "securityContext" not in predictor:
        skips[KNATIVE_POD_SECURITY_SKIP[0]] = KNATIVE_POD_SECURITY_SKIP[1]
        assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "deployment.yaml").write_text(yaml.safe_dump_all([deployment, *policies,
                                                                    *by_kind(objects, "PodDisruptionBudget")]))
        result = checkov(Path(tmp), "kubernetes", skips)
    assert not result["failed"], result["failed"]
    assert result["passed"] > 50, result  # checkov's pod checks really ran


def test_kube_versions_match_the_chart():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == f">={KUBE_VERSIONS[0]}.0-0"


def test_the_guides_yaml_examples_validate():
    """The Kubernetes objects shown in helm/README.md (the ingress rate-limit EnvoyFilter, ...)
    validate like the chart's own; cert-manager's Certificate has no schema here."""
    text = (ROOT / "helm" / "README.md").read_text()
    blocks = re.findall(r"^( *)```yaml\n(.*?)^\1```", text, re.M | re.S)
    objects = []
    for indent, body in blocks:
        body = "\n".join(line[len(indent):] for line in body.splitlines())
        objects += [d for d in yaml.safe_load_all(body) if isinstance(d, dict) and "kind" in d]
    kinds = {o["kind"] for o in objects}
    assert {"EnvoyFilter", "Certificate"} <= kinds, kinds
    for obj in objects:
        if obj["apiVersion"].startswith("cert-manager.io/"):
            with pytest.raises(NotCovered):
                validate_object(obj)
            continue
        validate_object(obj)


def test_a_gpu_pod_asks_for_cuda_and_a_cpu_pod_for_the_onnx_engine():
    gpu = env_of(predictor_container(render(sets=("gpu.enabled=true",))))
    assert gpu["DEVICE"] == "cuda" and gpu["ENGINE"] == "auto"  # auto on CUDA is torch; no GPU there stops the pod
    assert gpu["MAX_BATCH_SIZE"] == "256"
    cpu = env_of(predictor_container(render(sets=("gpu.enabled=false",))))
    assert cpu["DEVICE"] == "auto" and cpu["ENGINE"] == "auto" and cpu["INTRA_OP_THREADS"] == "4"  # the 4-CPU limit
    assert cpu["MAX_BATCH_SIZE"] == "32"
    assert env_of(predictor_container(render(sets=("batching.maxBatchSize=64",))))["MAX_BATCH_SIZE"] == "64"
    # One engine process computes for every front end: the workers do not divide the cores.
    assert env_of(predictor_container(render(sets=("resources.limits.cpu=2500m", "model.workers=2"))))["INTRA_OP_THREADS"] == "2"
    assert env_of(predictor_container(render(sets=("resources.limits=null",))))["INTRA_OP_THREADS"] == "0"
    assert env_of(predictor_container(render(sets=("gpu.enabled=true", "model.device=cpu"))))["DEVICE"] == "cpu"
