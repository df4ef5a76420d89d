# The container image (Dockerfile): included by the Makefile. The work is done by .ci/image.sh.
#
#   make image                  build $(IMAGE): docker when `docker info` works, else podman (installed
#                               with apt-get when missing; no registry needed, see .ci/image.sh)
#   make run-image PORT=8080    run it in the foreground as the chart's pod does (uid 10001, read-only
#                               root filesystem, only /tmp writable, capabilities dropped, the chart's
#                               args and env); Ctrl-C or SIGTERM drains it and stops it
#   make test-image             build with podman if needed, then the image tests (tests/test_image.py:
#                               the chart's rendered pod run with `podman kube play`)
#
# IMAGE=name:tag changes the image; ENGINE=docker|podman forces the engine of `make image`.

IMAGE ?= cifar10-kserve-predictor:dev
IMAGE_SH := .ci/image.sh
IMAGE_INPUTS := Dockerfile .dockerignore pyproject.toml README.md $(shell find predictor -type f ! -name '*.pyc' 2>/dev/null)
# A stamp per image name: `make test-image` rebuilds only when an input changed (the engine's layer
# cache makes an unchanged rebuild quick anyway).
IMAGE_STAMP = .cache/image/$(subst /,_,$(subst :,_,$(IMAGE))).built

.PHONY: image run-image test-image image-setup

image-setup:
	$(IMAGE_SH) setup

image:
	PYTHON=$(PYTHON) $(IMAGE_SH) build $(IMAGE)
	if [ "$$($(IMAGE_SH) engine)" = podman ]; then mkdir -p $(dir $(IMAGE_STAMP)) && touch $(IMAGE_STAMP); fi

$(IMAGE_STAMP): $(IMAGE_INPUTS)
	PYTHON=$(PYTHON) ENGINE=podman $(IMAGE_SH) build $(IMAGE)
	mkdir -p $(dir $@) && touch $@

# The chart's env and flags come from `helm template` (deploy-tools) read by the venv's python.
run-image: install $(TOOLS_DIR)/.helm-$(HELM_VERSION)
	@$(IMAGE_SH) exists $(IMAGE) 2>/dev/null || [ "$$($(IMAGE_SH) engine)" = docker ] || \
	  { echo "$(IMAGE) is not built: run make image" >&2; exit 1; }
	exec env PYTHON=$(PY) $(IMAGE_SH) run $(IMAGE) $(PORT)

# Always re-checks that podman's store has the image (a stamp alone could outlive it).
test-image: install deploy-tools image-setup
	@$(IMAGE_SH) exists $(IMAGE) || rm -f $(IMAGE_STAMP)
	$(MAKE) --no-print-directory $(IMAGE_STAMP) IMAGE=$(IMAGE)
	PREDICTOR_IMAGE=$(IMAGE) $(PY) -m pytest -q -m image tests/test_image.py
	@echo "what the image costs (size, start to ready; written by the tests):" && cat .cache/image/report.json
