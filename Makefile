# The two commands the README gives: `make run` and `make test` (`make test-fast`: the quick subset).
# The container image (image.mk): `make image`, `make run-image PORT=P`, `make test-image`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8080
DATA ?= ../shared/data/cifar10-train-jpeg.tar.gz
DATA_DIR ?= .cache/cifar10

.PHONY: install run test test-fast browser redis-server train train-gpu device-data train-device-dry-run train-gpu-export evaluate data bench bench-peers soak

include deploy.mk
include image.mk

install: $(VENV)/.installed

# Idempotent: re-runs only when pyproject.toml changes. torch/torchvision come from the machine's
# local wheel cache where pip has one (see README).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[torch,train,test]'
	touch $@

run: install
	$(PY) -m predictor --http_port $(PORT)

test: install deploy-tools browser redis-server
	$(PY) -m pytest -q

# The edit-run loop: unit and in-process tests only (tests/conftest.py says what is slow); `make test`
# stays the whole truth.
test-fast: install deploy-tools
	$(PY) -m pytest -q -m "not slow"

# The jobs and cache tests start Debian's redis-server on a free port (tests/redis_server.py).
redis-server:
	command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }

# Chromium and its WebDriver from Debian, for the demo page's real-browser test (tests/test_ui.py).
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

$(DATA_DIR)/train: $(DATA)
	mkdir -p $(DATA_DIR) && tar -xzf $(DATA) -C $(DATA_DIR)
	touch $@

data: $(DATA_DIR)/train

# The CPU recipe (the training defaults: 40 one-cycle epochs, batch 128, peak LR 0.1, Cutout 12; ≈ 5 h on a
# 2-core CPU, 91.68 %), writing predictor/weights/; then the int8 calibration set (training-split images).
train: install data
	$(PY) -m predictor.training.train --data $(DATA_DIR)/train
	$(PY) -m predictor.training.quantize --data $(DATA_DIR)/train

# The shipped weights (93.12 %): the same recipe on CUDA for 80 epochs, then 80 more warm-started from
# them (≈ 11 min on one H200), writing predictor/weights/; then the int8 calibration set.
train-gpu: install data
	$(PY) -m predictor.training.train --data $(DATA_DIR)/train --device cuda --epochs 80 --run-dir runs/gpu --out runs/gpu/export
	$(PY) -m predictor.training.train --data $(DATA_DIR)/train --device cuda --epochs 80 --init-from runs/gpu/export --run-dir runs/gpu2
	$(PY) -m predictor.training.quantize --data $(DATA_DIR)/train

# The ta-ema-200 recipe (README "Training and evaluation"), trained in one device call:
#   make device-data                                   # here: .cache/device/, what the call carries (15.6 MiB)
#   bash predictor/training/device_run.sh             # the device call (carry .cache/device, timeout_s 600)
#   make train-gpu-export RESULT=<its files_at folder> # here: export, int8 graph + calibration set, evaluation
# Nothing here writes predictor/weights/: the export goes to $(EXPORT).
DEVICE_DIR := .cache/device
RESULT ?=
EXPORT ?= runs/ta-ema-200/export
device-data: $(DEVICE_DIR)/cifar10-train-jpeg.tar.gz

$(DEVICE_DIR)/cifar10-train-jpeg.tar.gz: $(DATA)
	mkdir -p $(DEVICE_DIR) && cp $(DATA) $@

train-gpu-export: install data
	@test -n "$(RESULT)" || { echo "usage: make train-gpu-export RESULT=<folder with result.json and weights-*.safetensors>"; exit 2; }
	$(PY) -m predictor.training.train --data $(DATA_DIR)/train --from-result $(RESULT) --out $(EXPORT)
	$(PY) -m predictor.training.quantize --data $(DATA_DIR)/train --out $(EXPORT)
	$(PY) -m predictor.training.evaluate --data $(DATA_DIR)/train --model_dir $(EXPORT) --precision fp32 --no-compile --out $(EXPORT)/evaluation-fp32
	$(PY) -m predictor.training.evaluate --data $(DATA_DIR)/train --model_dir $(EXPORT) --precision int8 --engine onnx --out $(EXPORT)/evaluation-int8

# The device call's exact script on this CPU: 2 epochs of 2,048 training images (batch 512, compiled;
# ≈ 15 min on 2 busy cores), then the export path above. 8 steps cannot warm up to the recipe's peak LR,
# so the network is untrained: the int8 gate's refusal to serve it is the expected end (the `-`).
train-device-dry-run: install device-data data
	rm -rf runs/dry-run
	PY=$(PY) OUT=runs/dry-run/out RUN_DIR=runs/dry-run/run BUDGET=3600 \
	  bash predictor/training/device_run.sh --device cpu --limit 2048 --epochs 2
	$(PY) -m predictor.training.train --data $(DATA_DIR)/train --from-result runs/dry-run/out --out runs/dry-run/export
	$(PY) -m predictor.training.quantize --data $(DATA_DIR)/train --out runs/dry-run/export
	$(PY) -m predictor.training.evaluate --data $(DATA_DIR)/train --model_dir runs/dry-run/export --precision fp32 --no-compile --out runs/dry-run/export/evaluation-fp32
	-$(PY) -m predictor.training.evaluate --data $(DATA_DIR)/train --model_dir runs/dry-run/export --precision int8 --engine onnx --out runs/dry-run/export/evaluation-int8

evaluate: install data
	$(PY) -m predictor.training.evaluate --data $(DATA_DIR)/train

# Throughput/latency of the predictor vs its peers (bench/peers/), the seed-style baseline and the
# model alone, and past saturation; gRPC (BYTES, UINT8) beside multipart; the stack's own cost per
# request kind with a null model, the predictor's and the peers'; then the workers x threads table the
# chart's defaults come from (run on a quiet machine).
bench: install bench-peers
	$(PY) bench/run.py
	$(PY) bench/grpc_vs_multipart.py
	$(PY) bench/stack_cost.py
	$(PY) bench/scaling.py
	$(PY) bench/engine_process.py
	$(PY) bench/targets.py

# The servers a user would pick instead, each in a virtual environment of its own (pinned in
# bench/peers/requirements-*.txt; remade when those change).
PEERS := mlserver bentoml ray triton
PEER_VENVS := .cache/bench-peers
bench-peers: $(foreach p,$(PEERS),$(PEER_VENVS)/$(p)/.installed)

$(PEER_VENVS)/%/.installed: bench/peers/requirements-%.txt
	$(PYTHON) -m venv $(PEER_VENVS)/$*
	$(PEER_VENVS)/$*/bin/python -m pip install --quiet --upgrade pip
	$(PEER_VENVS)/$*/bin/python -m pip install --quiet -r $<
	touch $@

# Triton's Python-backend stub (started by PyTriton for each model) links Debian's libpython3.11, so
# Triton's environment is made with Debian's own python3.11 (from Debian's packages if missing), not
# another build of 3.11 such as $(PYTHON); an environment made from another one is made anew.
DEBIAN_PYTHON := /usr/bin/python3.11
$(PEER_VENVS)/triton/.installed: bench/peers/requirements-triton.txt
	dpkg -s python3.11-venv python3.11-dev >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq python3.11-venv python3.11-dev; }
	grep -qs '^executable = $(DEBIAN_PYTHON)$$' $(PEER_VENVS)/triton/pyvenv.cfg || rm -rf $(PEER_VENVS)/triton
	$(DEBIAN_PYTHON) -m venv $(PEER_VENVS)/triton
	$(PEER_VENVS)/triton/bin/python -m pip install --quiet --upgrade pip
	$(PEER_VENVS)/triton/bin/python -m pip install --quiet -r $<
	touch $@

# 10 minutes at 80 % of saturation: RSS growth and error count (not in CI).
soak: install
	$(PY) bench/soak.py
