"""The pod the chart asks KServe for, as a Kubernetes Pod that podman can run.

The chart's InferenceService carries the predictor's pod spec (containers, volumes, security
contexts, service account, scheduling) next to KServe's own fields (replicas, autoscaling, Knative
timeout and concurrency, canary). `pod()` keeps the pod spec and drops KServe's fields; a field it
knows neither way fails loudly, so a chart change cannot slip past the image tests unseen. Local
changes, all listed here: the image (the one built here), imagePullPolicy Never, restartPolicy
Never (a test reads the exit status), the pod's name, and no `ports` list on the container (it
only names the port the args already set; podman 4.3 refuses port mappings on the host network,
which these machines need). What KServe and Knative add around it
(the queue-proxy sidecar, the storage initializer when model.storageUri is set) is not reproduced.

  python .ci/chart_pod.py pod --image IMG --port P [--values F] [--set k=v ...]   Pod YAML on stdout
  python .ci/chart_pod.py run-flags --image IMG --port P ...   `podman run`/`docker run` flags, NUL-separated

Used by .ci/image.sh (make run-image) and tests/test_image.py (podman kube play).
"""

import argparse
import copy
import subprocess
import sys

import yaml

CHART = "helm/cifar10-classifier"
RELEASE = "cifar10-classifier"
CONTAINER = "kserve-container"
# Fields of KServe's PredictorSpec that are not PodSpec fields (serving.kserve.io/v1beta1).
KSERVE_FIELDS = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "containerConcurrency", "timeout",
                 "canaryTrafficPercent", "autoScaling", "deploymentStrategy", "batcher", "logger", "labels",
                 "annotations", "workerSpec"}
# The PodSpec fields the chart sets (or may set); podman ignores the scheduling ones.
POD_FIELDS = {"containers", "initContainers", "volumes", "securityContext", "serviceAccountName",
              "automountServiceAccountToken", "imagePullSecrets", "priorityClassName", "terminationGracePeriodSeconds",
              "nodeSelector", "tolerations", "affinity", "topologySpreadConstraints", "hostNetwork", "dnsPolicy",
              "enableServiceLinks", "runtimeClassName", "schedulerName", "hostAliases"}


def render(helm: str, port: int, values: list[str] = (), sets: list[str] = (), chart: str = CHART) -> list[dict]:
    args = [helm, "template", RELEASE, chart, "--set", f"containerPort={port}"]
    for f in values:
        args += ["--values", f]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def pod(objects: list[dict], image: str, name: str = "cifar10-predictor") -> dict:
    """A Pod with the rendered InferenceService's predictor pod spec, running `image`."""
    (isvc,) = [o for o in objects if o["kind"] == "InferenceService"]
    predictor = copy.deepcopy(isvc["spec"]["predictor"])
    unknown = set(predictor) - KSERVE_FIELDS - POD_FIELDS
    if unknown:
        raise ValueError(f"the predictor spec has fields this Pod conversion does not know: {sorted(unknown)}")
    spec = {k: v for k, v in predictor.items() if k in POD_FIELDS}
    (container,) = [c for c in spec["containers"] if c["name"] == CONTAINER]
    container["image"] = image
    container["imagePullPolicy"] = "Never"
    container.pop("ports", None)
    spec["restartPolicy"] = "Never"
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": predictor.get("labels", {}),
                         "annotations": predictor.get("annotations", {})},
            "spec": spec}


def run_flags(pod_: dict) -> list[str]:
    """`podman run` flags for the pod's predictor container (the image last; its args after it)."""
    spec = pod_["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == CONTAINER]
    security = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
    flags = []
    if "runAsUser" in security:
        flags += ["--user", f"{security['runAsUser']}:{security.get('runAsGroup', security['runAsUser'])}"]
    if security.get("readOnlyRootFilesystem"):
        flags.append("--read-only")
    for cap in security.get("capabilities", {}).get("drop", []):
        flags += ["--cap-drop", cap]
    for cap in security.get("capabilities", {}).get("add", []):
        flags += ["--cap-add", cap]
    if security.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "emptyDir" not in volume:
            raise ValueError(f"volume {mount['name']}: only emptyDir volumes can be run locally")
        size = volume["emptyDir"].get("sizeLimit")
        flags += ["--tmpfs", mount["mountPath"] + (f":size={size.replace('Gi', 'g').replace('Mi', 'm')}" if size else "")]
    for env in container.get("env", []):
        if "value" not in env:
            raise ValueError(f"env {env['name']}: only literal values can be run locally")
        flags += ["--env", f"{env['name']}={env['value']}"]
    limits = container.get("resources", {}).get("limits", {})
    if "cpu" in limits:
        cpu = str(limits["cpu"])
        flags += ["--cpus", str(int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu))]
    if "memory" in limits:
        flags += ["--memory", str(limits["memory"]).replace("Gi", "g").replace("Mi", "m")]
    if "command" in container:
        flags += ["--entrypoint", container["command"][0]]
    flags.append(container["image"])
    flags += container.get("command", [])[1:] + container.get("args", [])
    return flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["pod", "run-flags"])
    parser.add_argument("--image", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--helm", default=".cache/tools/bin/helm")
    parser.add_argument("--values", action="append", default=[])
    parser.add_argument("--set", action="append", default=[], dest="sets")
    parser.add_argument("--name", default="cifar10-predictor")
    args = parser.parse_args()
    pod_ = pod(render(args.helm, args.port, args.values, args.sets), args.image, args.name)
    if args.what == "pod":
        yaml.safe_dump(pod_, sys.stdout, sort_keys=False)
    else:
        sys.stdout.write("".join(flag + "\0" for flag in run_flags(pod_)))


if __name__ == "__main__":
    main()
