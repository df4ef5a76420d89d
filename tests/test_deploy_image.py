"""The Dockerfile and its build context, without building: hadolint and checkov find nothing; the
stages keep their promises (Debian 12 base in both stages, non-root numeric user, port 8080, tini
running the predictor as entrypoint, the venv copied from the builder, the compiler torch.compile
needs in the final stage); the dependency layer installs exactly pyproject.toml's pins, which are what
this test suite runs on; the build context is what the image needs. The built image itself is run
by tests/test_image.py (`make test-image`)."""

import json
import os
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from .deploy_common import (CHECKOV, CHART, DOCKERFILE, HADOLINT, ROOT, dockerfile_stages, dockerignore_context, render,
                            predictor_container, run, tool)

# What the builder stage leaves out of both images: what trains, loads training data, quantizes and reports.

# checkov checks skipped on the Dockerfile, each with its reason (none needed so far).
DOCKERFILE_CHECKOV_SKIPS: dict[str, str] = {}


def test_hadolint_finds_nothing():
    result = run([tool(HADOLINT), "--failure-threshold", "style", "--format", "json", DOCKERFILE], check=False)
    assert result.returncode == 0 and json.loads(result.stdout or "[]") == [], result.stdout + result.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nCMD python -m predictor\n")
    result = run([tool(HADOLINT), "--format", "json", bad], check=False)
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert result.returncode != 0 and {"DL3007", "DL3013", "DL3042"} <= codes, codes


def test_checkov_passes_on_the_dockerfile():
    args = [tool(CHECKOV), "--quiet", "--compact", "--skip-download", "--output", "json", "--framework", "dockerfile",
            "--file", DOCKERFILE]
    if DOCKERFILE_CHECKOV_SKIPS:
        args += ["--skip-check", ",".join(DOCKERFILE_CHECKOV_SKIPS)]
    report = json.loads(run(args, check=False, timeout=300).stdout)
    summary = report["summary"]
    failed = [(c["check_id"], c["check_name"]) for c in report["results"]["failed_checks"]]
    assert summary["failed"] == 0 and not failed, failed
    assert summary["passed"] > 20, summary  # it really ran its Dockerfile checks


def stages_by_name() -> dict[str, dict]:
    return {stage["name"]: stage for stage in dockerfile_stages()}


def settings_of(stage: dict) -> dict[str, str]:
    """Each instruction's last value in a stage (ENV, USER, LABEL ...)."""
    return dict(stage["instructions"][::-1])


def apt_installed(stage: dict) -> set[str]:
    runs = " ".join(args for name, args in stage["instructions"] if name == "RUN")
    return set(re.search(r"apt-get install -y --no-install-recommends ([\w. +-]+?)(?: &&|$)", runs).group(1).split())


def test_stages_keep_their_promises():
    stages = dockerfile_stages()
    named = stages_by_name()
    assert [s["name"] for s in stages] == ["deps", "deps-cuda", "builder", "runtime", "cuda", "cpu"]
    # The CPU image is the last stage: what `docker build .` makes without --target.
    assert stages[-1]["name"] == "cpu"
    # Debian 12's python3.11 (the venvs link to /usr/bin/python3.11); .ci/image.sh makes this base
    # locally where no registry answers, so the tag is the one Docker Hub has.
    for name in ("deps", "runtime"):
        assert named[name]["from"] == "debian:bookworm-slim", f"{name}: base image {named[name]['from']}"
    assert (named["deps-cuda"]["from"], named["builder"]["from"]) == ("deps", "deps")
    assert (named["cuda"]["from"], named["cpu"]["from"]) == ("runtime", "runtime")
    runtime = settings_of(named["runtime"])
    container = predictor_container(render())
    # Port and entrypoint, as the chart's container uses them: tini as PID 1 (it passes SIGTERM on
    # and reaps child processes), running the predictor.
    assert runtime["EXPOSE"] == str(container["ports"][0]["containerPort"]) == "8080"
    assert json.loads(runtime["ENTRYPOINT"]) == ["/usr/bin/tini", "--", "python", "-m", "predictor"]
    assert "command" not in container, "the chart must keep the image's entrypoint"
    assert "/health" in runtime["HEALTHCHECK"] and "PATH=/opt/venv/bin:$PATH" in runtime["ENV"]
    assert {"python3", "tini"} <= apt_installed(named["runtime"])
    # Only the CUDA image has the toolchain torch.compile needs at load (C/C++ compilers, Python's
    # headers, openssl); the CPU image has neither it nor torch.
    assert {"python3-dev", "gcc", "g++", "openssl"} <= apt_installed(named["cuda"])
    assert not {"python3-dev", "gcc", "g++"} & apt_installed(named["runtime"])
    assert "torch" in " ".join(args for _, args in named["deps-cuda"]["instructions"])
    security = container["securityContext"]
    for name, venv in (("cpu", "deps"), ("cuda", "deps-cuda")):
        final = named[name]
        instructions = [i for i, _ in final["instructions"]]
        # Non-root, by number (so that Kubernetes' runAsNonRoot can verify it), and the chart agrees.
        uid, _, gid = settings_of(final)["USER"].partition(":")
        assert uid.isdigit() and int(uid) >= 1000 and (not gid or gid.isdigit()), name
        assert instructions.index("USER") > max(i for i, n in enumerate(instructions) if n in ("RUN", "COPY"))
        assert security["runAsUser"] == int(uid) and security["runAsNonRoot"] is True
        # Two layers: the dependencies' venv (unchanged by a code change), then the project's own files.
        copies = [args for n, args in final["instructions"] if n == "COPY"]
        assert copies == [f"--from={venv} /opt/venv /opt/venv", "--from=builder /staging/opt/venv /opt/venv"], copies
    # The final stages install Debian packages only; no pip: they take the builders' venvs.
    for name in ("runtime", "cuda", "cpu"):
        runs = " ".join(args for n, args in named[name]["instructions"] if n == "RUN")
        assert not re.search(r"\b(pip|curl|wget)\b", runs), runs
        assert not runs or "rm -rf /var/lib/apt/lists/*" in runs
    (project_run,) = [args for n, args in named["builder"]["instructions"] if n == "RUN" and "pip wheel" in args]
    assert "--root /staging" in project_run and "predictor.weights" in project_run
    # The build-time package stays out of both images (and its bytecode with it).
    assert "rm -r /staging/opt/venv/lib/python3.11/site-packages/predictor/training" in project_run, project_run
    # No pip cache left in the builders' layers either (the venv is what gets copied).
    for name in ("deps", "deps-cuda", "builder"):
        for n, args in named[name]["instructions"]:
            if n == "RUN" and re.search(r"\bpip (install|wheel)\b", args):
                assert args.count("--no-cache-dir") >= args.count("pip install") + args.count("pip wheel"), args


def test_build_context_is_what_the_image_needs():
    context = dockerignore_context()
    weights = {p.relative_to(ROOT).as_posix() for p in (ROOT / "predictor" / "weights").iterdir() if p.is_file()}
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "predictor").glob("*.py")}
    assert {"pyproject.toml", "README.md"} | weights | modules <= context
    leaked = [p for p in context if p.split("/")[0] in {".venv", ".cache", ".git", "tests", "runs", "reports", "helm",
                                                         "manifests"} or "__pycache__" in p or p.endswith(".pyc")]
    assert not leaked, leaked
    assert sum((ROOT / p).stat().st_size for p in context) < 100 * 2**20  # a small context: weights plus code


@pytest.mark.parametrize("stage, declared_in", [("deps", ("dependencies",)),
                                                 ("deps-cuda", ("optional-dependencies", "torch"))])
def test_dependency_layers_install_exactly_the_pins_this_suite_runs_on(tmp_path, stage, declared_in):
    """Each deps stage's RUN writes requirements from pyproject.toml and installs them: run its
    requirements command for real, and compare with pyproject.toml and with this environment."""
    (step,) = [args for name, args in stages_by_name()[stage]["instructions"] if name == "RUN" and "requirements" in args]
    requirements_file = re.search(r"> (/tmp/requirements[\w-]*\.txt)", step).group(1)
    command = step.split("&&")[0].replace(requirements_file, str(tmp_path / "requirements.txt"))
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert f"--requirement {requirements_file}" in step
    requirements = [Requirement(line) for line in (tmp_path / "requirements.txt").read_text().split()]
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for key in declared_in:
        declared = declared[key]
    assert [str(r) for r in requirements] == [str(Requirement(d)) for d in declared]
    for requirement in requirements:
        (pin,) = requirement.specifier
        assert pin.operator == "==", f"{requirement} is not pinned: the image would not be reproducible"
        installed = metadata.version(requirement.name)
        assert requirement.specifier.contains(installed), f"tests run {requirement.name} {installed}, the image {pin}"


def test_chart_image_defaults_match_the_dockerfile():
    chart = (CHART / "Chart.yaml").read_text()
    app_version = re.search(r'^appVersion:\s*"?([^"\n]+)"?', chart, re.M).group(1)
    runtime = settings_of(stages_by_name()["runtime"])
    assert f'org.opencontainers.image.version="{app_version}"' in runtime["LABEL"]
    project_version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert app_version == project_version
    # gpu.enabled (the default) picks the CUDA image, a CPU node the CPU image; both tags overridable.
    assert predictor_container(render())["image"] == f"cifar10-kserve-predictor:{app_version}-cuda"
    assert predictor_container(render(sets=("gpu.enabled=false",)))["image"] == f"cifar10-kserve-predictor:{app_version}"
    assert predictor_container(render(sets=("image.cudaTag=gpu-7",)))["image"] == "cifar10-kserve-predictor:gpu-7"
    assert predictor_container(render(sets=("gpu.enabled=false", "image.tag=cpu-7")))["image"] == \
        "cifar10-kserve-predictor:cpu-7"


def test_the_image_has_what_the_chart_runs_in_it():
    """The chart's preStop hook (Standard mode) execs `sleep`: the final stage must be a base with
    coreutils (Debian's slim image has /bin/sleep; distroless or scratch would not), and the hook
    must run as the image's user without writing anywhere (the root is read-only)."""
    runtime = stages_by_name()["runtime"]
    assert re.fullmatch(r"debian:(bookworm|trixie)-slim", runtime["from"]), runtime["from"]
    objects = render(CHART / "ci" / "standard-values.yaml")
    command = predictor_container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and command[1].isdigit()
    # The user the chart asks for is the Dockerfile's USER, in both images.
    for name in ("cpu", "cuda"):
        assert settings_of(stages_by_name()[name])["USER"] == "10001:10001"
    assert predictor_container(objects)["securityContext"]["runAsUser"] == 10001
