# lorapipe — every target creates/refreshes .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
# CPU wheel for this machine; GPU images install CUDA torch instead (images/).
TORCH_SPEC ?= torch==2.13.0
PYTEST_FLAGS ?=

.PHONY: setup run compile submit schedule test test-slow test-faults lint bench bench-gpu \
	tiny-model world-model world-tagger clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[tagger,test]"
	rm -f $(VENV)/.installed-*
	touch $@

run: $(STAMP)
	$(BIN)/python -m pipelines run-local --out runs/pipeline $(PARAMS)

# pipeline parameters for run/submit/schedule: PARAMS="--param num_gpus=4 --params my.yaml"
PARAMS ?=
# KFP cron, six fields (seconds first): Mondays at 03:00
SCHEDULE ?= 0 0 3 * * 1

compile: $(STAMP)
	$(BIN)/python -m pipelines compile

submit: $(STAMP)
	$(BIN)/python -m pipelines submit $(PARAMS)

schedule: $(STAMP)
	$(BIN)/python -m pipelines schedule --cron "$(SCHEDULE)" $(PARAMS)

# everything but `slow`: the fault suite fits CI's time, so CI runs it too
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_FLAGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(PYTEST_FLAGS)

test-faults: $(STAMP)
	$(BIN)/python -m pytest -m faults $(PYTEST_FLAGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests components pipelines bench
	$(BIN)/ruff format --check src tests components pipelines bench

bench: $(STAMP)
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/generate_throughput.py
	$(BIN)/python bench/ingest_throughput.py

# on a CUDA machine (TORCH_SPEC naming a CUDA build): full-size SD 1.5 / SDXL, about 5 minutes
bench-gpu: $(STAMP)
	$(BIN)/python bench/gpu.py

tiny-model: $(STAMP)
	$(BIN)/lorapipe tiny-model models/tiny-sd

# the demo's committed assets, retrained from scratch (about 30 and 2 minutes on 2 cores)
world-model: $(STAMP)
	$(BIN)/python -m lorapipe.demo.world_model --out assets/world-sd

world-tagger: $(STAMP)
	$(BIN)/python -m lorapipe.demo.world_tagger --out assets/world-tagger

clean:
	rm -rf $(VENV) runs models .pytest_cache

# ---- container images: images/*.Dockerfile, build context = the repository root -----------
# `make images REGISTRY=registry.example.com/ml TAG=0.1.0` builds lorapipe-{base,tagger,torch}
# with docker (buildah where there is no docker), named exactly as components/images.py names
# them. Defaults follow what that module reads: LORAPIPE_REGISTRY / LORAPIPE_IMAGE_TAG, else
# ghcr.io/lorapipe and the version in pyproject.toml. REGISTRY/TAG given on the command line
# are exported as LORAPIPE_REGISTRY/LORAPIPE_IMAGE_TAG, so `make images compile submit
# REGISTRY=... TAG=...` builds and runs the same images.
PACKAGE_VERSION := $(shell sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n 1)
REGISTRY ?= $(or $(LORAPIPE_REGISTRY),ghcr.io/lorapipe)
TAG ?= $(or $(LORAPIPE_IMAGE_TAG),$(PACKAGE_VERSION))
ifeq ($(origin REGISTRY),command line)
export LORAPIPE_REGISTRY := $(REGISTRY)
endif
ifeq ($(origin TAG),command line)
export LORAPIPE_IMAGE_TAG := $(TAG)
endif
CONTAINER_TOOL ?= $(shell command -v docker >/dev/null && echo docker || echo buildah)
# buildah spells build `bud` (and caches layers only when asked)
CONTAINER_BUILD = $(if $(filter buildah,$(notdir $(CONTAINER_TOOL))),bud --layers,build)
# torch's CUDA build for lorapipe-torch (a download.pytorch.org/whl/<variant> index)
CUDA_VARIANT ?= cu128
# extra build flags, e.g. IMAGE_BUILD_FLAGS="--pull --build-arg TORCH_VERSION=2.13.0"
IMAGE_BUILD_FLAGS ?=
IMAGE_NAMES := base tagger torch
IMAGE_BUILD_ARGS = --build-arg LORAPIPE_VERSION=$(PACKAGE_VERSION) \
	--build-arg VCS_REF=$(shell git rev-parse --short HEAD 2>/dev/null || echo unknown) \
	--build-arg BUILD_DATE=$(shell date -u +%Y-%m-%dT%H:%M:%SZ)

.PHONY: images push-images $(addprefix image-,$(IMAGE_NAMES)) $(addprefix push-image-,$(IMAGE_NAMES))

images: $(addprefix image-,$(IMAGE_NAMES))

$(addprefix image-,$(IMAGE_NAMES)): image-%:
	$(CONTAINER_TOOL) $(CONTAINER_BUILD) $(IMAGE_BUILD_ARGS) $(if $(filter torch,$*),--build-arg CUDA_VARIANT=$(CUDA_VARIANT)) $(IMAGE_BUILD_FLAGS) -f images/$*.Dockerfile -t $(REGISTRY)/lorapipe-$*:$(TAG) .

push-images: $(addprefix push-image-,$(IMAGE_NAMES))

$(addprefix push-image-,$(IMAGE_NAMES)): push-image-%:
	$(CONTAINER_TOOL) push $(REGISTRY)/lorapipe-$*:$(TAG)
