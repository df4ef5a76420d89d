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

from packaging.requirements import Requirement

from .deploy_common import (CHECKOV, CHART, DOCKERFILE, HADOLINT, ROOT, dockerfile_stages, dockerignore_context, render,
                            predictor_container, run, tool)

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


def test_stages_keep_their_promises():
    deps, builder, final = dockerfile_stages()
    assert (deps["name"], builder["name"], final["name"]) == ("deps", "builder", None)
    # Debian 12's python3.11 (the venv links to /usr/bin/python3.11); .ci/image.sh makes this base
    # locally where no registry answers, so the tag is the one Docker Hub has. The builder stage
    # starts from the deps stage: the same venv, the same Python.
    for stage in (deps, final):
        assert stage["from"] == "debian:bookworm-slim", f"base image {stage['from']}"
    assert builder["from"] == "deps"
    final_ = dict(final["instructions"][::-1])  # last occurrence of each instruction wins
    instructions = [i for i, _ in final["instructions"]]
    # Non-root, by number (so that Kubernetes' runAsNonRoot can verify it), and the chart agrees.
    uid, _, gid = final_["USER"].partition(":")
    assert uid.isdigit() and int(uid) >= 1000 and (not gid or gid.isdigit()), final_["USER"]
    assert instructions.index("USER") > max(i for i, name in enumerate(instructions) if name in ("RUN", "COPY"))
    security = predictor_container(render())["securityContext"]
    assert security["runAsUser"] == int(uid) and security["runAsNonRoot"] is True
    # Port and entrypoint, as the chart's container uses them: tini as PID 1 (it passes SIGTERM on
    # and reaps the compiler's children), running the predictor.
    container = predictor_container(render())
    assert final_["EXPOSE"] == str(container["ports"][0]["containerPort"]) == "8080"
    assert json.loads(final_["ENTRYPOINT"]) == ["/usr/bin/tini", "--", "python", "-m", "predictor"]
    assert "command" not in container, "the chart must keep the image's entrypoint"
    assert "/health" in final_["HEALTHCHECK"]
    # The final stage installs Debian packages only (python3, tini, and what torch.compile needs at
    # load: the C/C++ toolchain, Python's headers, openssl); no pip: it takes the builder's venv.
    runs = " ".join(args for name, args in final["instructions"] if name == "RUN")
    installed = set(re.search(r"apt-get install -y --no-install-recommends ([\w. +-]+?)(?: &&|$)", runs).group(1).split())
    assert {"python3", "python3-dev", "gcc", "g++", "openssl", "tini"} <= installed, installed
    assert not re.search(r"\b(pip|curl|wget)\b", runs), runs
    assert "rm -rf /var/lib/apt/lists/*" in runs
    # Two layers: the dependencies' venv (unchanged by a code change), then the project's own files.
    copies = [args for name, args in final["instructions"] if name == "COPY"]
    assert copies == ["--from=deps /opt/venv /opt/venv", "--from=builder /staging/opt/venv /opt/venv"], copies
    (project_run,) = [args for name, args in builder["instructions"] if name == "RUN" and "pip wheel" in args]
    assert "--root /staging" in project_run and "predictor.weights" in project_run
    assert "PATH=/opt/venv/bin:$PATH" in final_["ENV"]
    # No pip cache left in the builder's layers either (the venv is what gets copied).
    for name, args in deps["instructions"] + builder["instructions"]:
        if name == "RUN" and re.search(r"\bpip (install|wheel)\b", args):
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


def test_dependency_layer_installs_exactly_the_pins_this_suite_runs_on(tmp_path):
    """The deps stage's RUN writes requirements from pyproject.toml and installs them: run its
    requirements command for real, and compare with pyproject.toml and with this environment."""
    deps = dockerfile_stages()[0]
    assert deps["name"] == "deps"
    (step,) = [args for name, args in deps["instructions"] if name == "RUN" and "requirements" in args]
    command = step.split("&&")[0].replace("/tmp/requirements.txt", str(tmp_path / "requirements.txt"))
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert "--requirement /tmp/requirements.txt" in step
    requirements = [Requirement(line) for line in (tmp_path / "requirements.txt").read_text().split()]
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [str(r) for r in requirements] == [str(Requirement(d)) for d in declared]
    for requirement in requirements:
        (pin,) = requirement.specifier
        assert pin.operator == "==", f"{requirement} is not pinned: the image would not be reproducible"
        installed = metadata.version(requirement.name)
        assert requirement.specifier.contains(installed), f"tests run {requirement.name} {installed}, the image {pin}"


def test_chart_image_defaults_match_the_dockerfile():
    chart = (CHART / "Chart.yaml").read_text()
    app_version = re.search(r'^appVersion:\s*"?([^"\n]+)"?', chart, re.M).group(1)
    final = dict(dockerfile_stages()[-1]["instructions"][::-1])
    assert f'org.opencontainers.image.version="{app_version}"' in final["LABEL"]
    project_version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert app_version == project_version
    assert predictor_container(render())["image"] == f"cifar10-kserve-predictor:{app_version}"


def test_the_image_has_what_the_chart_runs_in_it():
    """The chart's preStop hook (Standard mode) execs `sleep`: the final stage must be a base with
    coreutils (Debian's slim image has /bin/sleep; distroless or scratch would not), and the hook
    must run as the image's user without writing anywhere (the root is read-only)."""
    final = dockerfile_stages()[-1]
    assert re.fullmatch(r"debian:(bookworm|trixie)-slim", final["from"]), final["from"]
    objects = render(CHART / "ci" / "standard-values.yaml")
    command = predictor_container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and command[1].isdigit()
    # The user the chart asks for is the Dockerfile's USER.
    final_ = dict(final["instructions"][::-1])
    assert final_["USER"] == "10001:10001"
    assert predictor_container(objects)["securityContext"]["runAsUser"] == 10001
