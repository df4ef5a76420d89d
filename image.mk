# The container images (Dockerfile): included by the Makefile. The work is done by .ci/image.sh.
#
#   make image                  build the CPU image $(IMAGE) (ONNX Runtime, no torch): docker when
#                               `docker info` works, else podman (installed with apt-get when missing;
#                               no registry needed, see .ci/image.sh)
#   make image-cuda             build the CUDA image $(IMAGE_CUDA) (adds torch and the CUDA wheels)
#   make run-image PORT=8080    run it in the foreground as the chart's pod does (uid 10001, read-only
#                               root filesystem, only /tmp writable, capabilities dropped, the chart's
#                               args and env); Ctrl-C or SIGTERM drains it and stops it
#   make test-image             build both with podman if needed, then the image tests (tests/test_image.py:
#                               the chart's rendered pod run with `podman kube play`)
#
# IMAGE=name:tag, IMAGE_CUDA=name:tag change the images; ENGINE=docker|podman forces the engine.

IMAGE ?= cifar10-kserve-predictor:dev
IMAGE_CUDA ?= $(IMAGE)-cuda
IMAGE_SH := .ci/image.sh
IMAGE_INPUTS := Dockerfile .dockerignore pyproject.toml README.md $(shell find predictor -type f ! -name '*.pyc' 2>/dev/null)
# A stamp per image name: `make test-image` rebuilds only when an input changed (the engine's layer
# cache makes an unchanged rebuild quick anyway).
stamp = .cache/image/$(subst /,_,$(subst :,_,$(1))).built
IMAGE_STAMP = $(call stamp,$(IMAGE))
IMAGE_CUDA_STAMP = $(call stamp,$(IMAGE_CUDA))

.PHONY: image image-cuda run-image test-image image-setup

image-setup:
	$(IMAGE_SH) setup

image:
	PYTHON=$(PYTHON) $(IMAGE_SH) build $(IMAGE) cpu
	if [ "$$($(IMAGE_SH) engine)" = podman ]; then mkdir -p $(dir $(IMAGE_STAMP)) && touch $(IMAGE_STAMP); fi

image-cuda:
	PYTHON=$(PYTHON) $(IMAGE_SH) build $(IMAGE_CUDA) cuda
	if [ "$$($(IMAGE_SH) engine)" = podman ]; then mkdir -p $(dir $(IMAGE_CUDA_STAMP)) && touch $(IMAGE_CUDA_STAMP); fi

$(IMAGE_STAMP): $(IMAGE_INPUTS)
	PYTHON=$(PYTHON) ENGINE=podman $(IMAGE_SH) build $(IMAGE) cpu
	mkdir -p $(dir $@) && touch $@

$(IMAGE_CUDA_STAMP): $(IMAGE_INPUTS)
	PYTHON=$(PYTHON) ENGINE=podman $(IMAGE_SH) build $(IMAGE_CUDA) cuda
	mkdir -p $(dir $@) && touch $@

# The chart's env and flags come from `helm template` (deploy-tools) read by the venv's python.
run-image: install $(TOOLS_DIR)/.helm-$(HELM_VERSION)
	@$(IMAGE_SH) exists $(IMAGE) 2>/dev/null || [ "$$($(IMAGE_SH) engine)" = docker ] || \
	  { echo "$(IMAGE) is not built: run make image" >&2; exit 1; }
	exec env PYTHON=$(PY) $(IMAGE_SH) run $(IMAGE) $(PORT)

# Always re-checks that podman's store has the image (a stamp alone could outlive it).
test-image: install deploy-tools image-setup
	@$(IMAGE_SH) exists $(IMAGE) || rm -f $(IMAGE_STAMP)
	@$(IMAGE_SH) exists $(IMAGE_CUDA) || rm -f $(IMAGE_CUDA_STAMP)
	$(MAKE) --no-print-directory $(IMAGE_STAMP) $(IMAGE_CUDA_STAMP) IMAGE=$(IMAGE) IMAGE_CUDA=$(IMAGE_CUDA)
	PREDICTOR_IMAGE=$(IMAGE) PREDICTOR_IMAGE_CUDA=$(IMAGE_CUDA) $(PY) -m pytest -q -m image tests/test_image.py
	@echo "what the image costs (size, start to ready; written by the tests):" && cat .cache/image/report.json
