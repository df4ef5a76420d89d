# syntax=docker/dockerfile:1
# CIFAR-10 ResNet18 predictor on KServe's ModelServer (HTTP 8080), weights baked in.
#
#   docker build -t cifar10-kserve-predictor:1.0.0 .
#   docker run --rm -p 8080:8080 cifar10-kserve-predictor:1.0.0          # CPU
#   docker run --rm --gpus all -p 8080:8080 cifar10-kserve-predictor:1.0.0  # GPU (--device auto picks it)
#
# torch==2.14.1 from PyPI is the CUDA build: it carries its own CUDA runtime libraries as wheels and
# needs only the node's NVIDIA driver; with no GPU visible it runs on the CPU. The final stage has
# no compiler, no pip cache and no source tree: just the virtual environment and a non-root user.
# tests/test_deploy_image.py lints this file (hadolint, checkov) and runs the builder stage's
# project steps (the `pip wheel` / `pip install` of stage 2 below) on a copy of the build context.

# ---------------------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH

WORKDIR /src
RUN python -m venv /opt/venv

# 1. Dependencies, exactly as pinned in pyproject.toml [project.dependencies] (one source of
#    truth); this heavy layer (torch + CUDA wheels) is rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir --requirement /tmp/requirements.txt

# 2. The project as a wheel, without dependencies: the weights in predictor/weights/ are package
#    data, so they are baked into site-packages (and world-readable, whatever their mode here);
#    the build fails if the installed weights or int8 calibration images do not match their model
#    card's sha256.
COPY README.md ./
COPY predictor/ predictor/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/wheels . \
    && pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
    && python -I -c "import predictor.weights as w, predictor.quantize as q; q.calibration_images(w.PACKAGED_DIR, w.load_model(w.PACKAGED_DIR)[1])"

# ---------------------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="cifar10-kserve-predictor" \
      org.opencontainers.image.description="CIFAR-10 ResNet18 classifier on KServe (HTTP 8080, /classify/image)" \
      org.opencontainers.image.version="1.0.0" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it; HOME is /tmp, the only
# writable path when the pod runs with a read-only root filesystem (the chart mounts /tmp).
RUN groupadd --system --gid 10001 predictor \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin predictor

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /app
USER 10001:10001
EXPOSE 8080

# Docker's own check (Kubernetes ignores it and uses the chart's probes on the same path):
# /health answers 200 only once the weights are loaded and a forward pass has succeeded.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]

ENTRYPOINT ["python", "-m", "predictor"]
