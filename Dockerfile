# syntax=docker/dockerfile:1
# CIFAR-10 ResNet18 predictor on KServe's ModelServer (HTTP 8080), weights baked in. Two images:
#
#   cpu (the default, last stage): ONNX Runtime int8, explanations on ONNX Runtime too; no torch, no
#        CUDA, no compiler. `make image`, or `docker build -t cifar10-kserve-predictor:1.0.0 .`
#   cuda: adds torch (CUDA 13 wheels, the torch engine: fp16/bf16/fp32, CUDA graphs) and the C/C++
#        toolchain torch.compile needs at load. `make image-cuda`, or
#        `docker build --target cuda -t cifar10-kserve-predictor:1.0.0-cuda .`
#
#   docker run --rm -p 8080:8080 cifar10-kserve-predictor:1.0.0                     # CPU
#   docker run --rm --gpus all -p 8080:8080 cifar10-kserve-predictor:1.0.0-cuda     # GPU (--device auto picks it)
#
# Debian 12's python3.11 in every stage (the venvs link to /usr/bin/python3.11). torch==2.14.1 from
# PyPI is the CUDA 13 build: it carries its own CUDA runtime libraries as wheels and needs only the
# node's NVIDIA driver (>= 580); with no GPU visible it runs on the CPU. Where no registry can be
# reached, .ci/image.sh makes debian:bookworm-slim from debootstrap, so this file builds unchanged.
# tini is PID 1: it passes SIGTERM on to the predictor (which drains) and reaps child processes.
# Training, quantization and evaluation are workstation `make` targets: their modules are left out
# of both images. tests/test_deploy_image.py lints this file (hadolint, checkov); tests/test_image.py
# runs both images.

# ---------------------------------------------------------------------------------------------
# The serving dependencies (pyproject.toml [project.dependencies], exactly as pinned: one source of
# truth) in a virtual environment: the final stages copy it as one layer that a code change does
# not touch.
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

COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir --requirement /tmp/requirements.txt

# ---------------------------------------------------------------------------------------------
# The CUDA image's dependencies: the serving ones plus the `torch` extra (torch + CUDA wheels).
FROM deps AS deps-cuda

RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['torch']))" \
        > /tmp/requirements-torch.txt \
    && pip install --no-cache-dir --requirement /tmp/requirements-torch.txt

# ---------------------------------------------------------------------------------------------
FROM deps AS builder

# The project as a wheel, without dependencies: the weights in predictor/weights/ are package data,
# so they are baked into site-packages (and world-readable, whatever their mode here); the build
# fails if the installed weights, int8 calibration images or int8 ONNX graph do not match their model
# card's sha256. The same wheel is also installed under /staging (pip --root): just the project's
# files, at their /opt/venv paths, for the final stages' second, small layer, without the build-time
# package predictor.training (training, data loading, quantization, evaluation reports).
COPY README.md ./
COPY predictor/ predictor/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/wheels . \
    && pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
    && pip install --no-cache-dir --no-deps --ignore-installed --root /staging /tmp/wheels/*.whl \
    && python -I -c "import predictor.weights as w, predictor.engines.onnx_int8 as o; \
card = w.verified_weights(w.PACKAGED_DIR)[1]; w.calibration_images(w.PACKAGED_DIR, card); o.onnx_int8_path(w.PACKAGED_DIR, card)" \
    && rm -r /staging/opt/venv/lib/python3.11/site-packages/predictor/training

# ---------------------------------------------------------------------------------------------
# What both images run on: Python, tini as PID 1, the non-root user, the entrypoint.
FROM debian:bookworm-slim AS runtime

LABEL org.opencontainers.image.title="cifar10-kserve-predictor" \
      org.opencontainers.image.description="CIFAR-10 ResNet18 classifier on KServe (HTTP 8080, /classify/image)" \
      org.opencontainers.image.version="1.0.0" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it; HOME is /tmp, the only
# writable path when the pod runs with a read-only root filesystem (the chart mounts /tmp). /app
# (the WORKDIR) is made here: buildah creates a WORKDIR only for a later RUN, and a runtime cannot
# create it on a read-only root.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 predictor \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin predictor \
    && mkdir /app

ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /app
EXPOSE 8080

# Docker's own check (Kubernetes ignores it and uses the chart's probes on the same path):
# /health answers 200 only once the weights are loaded and a forward pass has succeeded.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]

ENTRYPOINT ["/usr/bin/tini", "--", "python", "-m", "predictor"]

# ---------------------------------------------------------------------------------------------
# The CUDA image (`--target cuda`): gcc, g++, python3-dev and openssl (inductor hashes its
# precompiled header with `openssl sha512`) for torch.compile / Triton at load.
FROM runtime AS cuda

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-dev gcc g++ openssl \
    && rm -rf /var/lib/apt/lists/*

COPY --from=deps-cuda /opt/venv /opt/venv
COPY --from=builder /staging/opt/venv /opt/venv

USER 10001:10001

# ---------------------------------------------------------------------------------------------
# The CPU image, the default target.
FROM runtime AS cpu

COPY --from=deps /opt/venv /opt/venv
COPY --from=builder /staging/opt/venv /opt/venv

USER 10001:10001
