# syntax=docker/dockerfile:1
# CIFAR-10 ResNet18 predictor on KServe's ModelServer (HTTP 8080), weights baked in.
#
#   make image                     # docker when `docker info` works, else podman (.ci/image.sh)
#   docker build -t cifar10-kserve-predictor:1.0.0 .
#   docker run --rm -p 8080:8080 cifar10-kserve-predictor:1.0.0              # CPU
#   docker run --rm --gpus all -p 8080:8080 cifar10-kserve-predictor:1.0.0   # GPU (--device auto picks it)
#
# Debian 12's python3.11 in both stages (the venv links to /usr/bin/python3.11). torch==2.14.1 from
# PyPI is the CUDA 13 build: it carries its own CUDA runtime libraries as wheels and needs only the
# node's NVIDIA driver (>= 580); with no GPU visible it runs on the CPU. Where no registry can be
# reached, .ci/image.sh makes debian:bookworm-slim from debootstrap, so this file builds unchanged.
# The final stage has a C/C++ toolchain and Python's headers: torch.compile (inductor) builds its
# CPU kernels with g++ at load, and Triton its CUDA launchers with gcc. tini is PID 1: it passes
# SIGTERM on to the predictor (which drains) and reaps the compiler's child processes.
# tests/test_deploy_image.py lints this file (hadolint, checkov); tests/test_image.py runs the image.

# ---------------------------------------------------------------------------------------------
# The virtual environment with the dependencies only: the final stage copies it as one layer that
# a code change does not touch.
FROM debian:bookworm-slim AS deps

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH

# Debian 12 is a stable release: its package versions change only for security fixes, which the
# build should take, so they are not pinned here.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /src

# 1. Dependencies, exactly as pinned in pyproject.toml [project.dependencies] (one source of
#    truth); this heavy layer (torch + CUDA wheels) is rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir --requirement /tmp/requirements.txt

# ---------------------------------------------------------------------------------------------
FROM deps AS builder

# 2. The project as a wheel, without dependencies: the weights in predictor/weights/ are package
#    data, so they are baked into site-packages (and world-readable, whatever their mode here);
#    the build fails if the installed weights, int8 calibration images or int8 ONNX graph do not
#    match their model card's sha256. The same wheel is also installed under /staging (pip --root): just the
#    project's files, at their /opt/venv paths, for the final stage's second, small layer.
COPY README.md ./
COPY predictor/ predictor/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/wheels . \
    && pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
    && pip install --no-cache-dir --no-deps --ignore-installed --root /staging /tmp/wheels/*.whl \
    && python -I -c "import predictor.weights as w, predictor.quantize as q, predictor.onnx_engine as o; \
card = w.load_model(w.PACKAGED_DIR)[1]; q.calibration_images(w.PACKAGED_DIR, card); o.onnx_int8_path(w.PACKAGED_DIR, card)"

# ---------------------------------------------------------------------------------------------
FROM debian:bookworm-slim

LABEL org.opencontainers.image.title="cifar10-kserve-predictor" \
      org.opencontainers.image.description="CIFAR-10 ResNet18 classifier on KServe (HTTP 8080, /classify/image)" \
      org.opencontainers.image.version="1.0.0" \
      org.opencontainers.image.licenses="Apache-2.0"

# python3 for the venv; gcc, g++, python3-dev and openssl (inductor hashes its precompiled header
# with `openssl sha512`) for torch.compile / Triton at load; tini as PID 1.
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it; HOME is /tmp, the only
# writable path when the pod runs with a read-only root filesystem (the chart mounts /tmp). /app
# (the WORKDIR) is made here: buildah creates a WORKDIR only for a later RUN, and a runtime cannot
# create it on a read-only root.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev gcc g++ openssl tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 predictor \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin predictor \
    && mkdir /app

COPY --from=deps /opt/venv /opt/venv
COPY --from=builder /staging/opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /app
USER 10001:10001
EXPOSE 8080

# Docker's own check (Kubernetes ignores it and uses the chart's probes on the same path):
# /health answers 200 only once the weights are loaded and a forward pass has succeeded.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]

ENTRYPOINT ["/usr/bin/tini", "--", "python", "-m", "predictor"]
