# `make run` and `make test` are the whole set-up: both install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install run test test-fast

install: $(VENV)/.installed

# torch==2.13.0 (pinned in pyproject.toml) is the CPU wheel pip takes from local disk.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: install
	$(VENV)/bin/brainmets run

test: install
	$(PY) -m pytest

# Everything but the end-to-end tests marked slow (real servers, browsers, training runs in subprocesses).
test-fast: install
	$(PY) -m pytest -m "not slow"

# Retrain, evaluate and ship both models as shipped in models/, tune the ensemble, pick `best` on validation,
# then regenerate docs/results.md. The runs go one after the other with both cores each: runs sharing the
# cores (with each other or with tests) trained the first shipped models at half speed. About 6 hours on
# 2 CPU cores; each run logs its images/s against an idle benchmark of its own step. The shipped Attention
# U-Net is its run fine-tuned for 22 more epochs with FLAIR standing in for T1 in 75% of slices
# (docs/experiments.md, "Fine-tuning for FLAIR alone").
DATA ?= ../shared/data/lgg
.PHONY: models
models: install
	$(VENV)/bin/brainmets split --data $(DATA) --out runs/split.json
	$(VENV)/bin/brainmets train --data $(DATA) --model attention-unet --split runs/split.json --out runs/attention-unet \
		--epochs 200 --time-budget 130 --threads 2 --missing-sequence 0.3 --no-progress
	$(VENV)/bin/brainmets train --data $(DATA) --model unetpp --split runs/split.json --out runs/unetpp \
		--epochs 400 --time-budget 150 --threads 2 --missing-sequence 0.3 --no-progress
	$(VENV)/bin/brainmets train --data $(DATA) --model attention-unet --split runs/split.json \
		--out runs/attention-unet-flair --init-from runs/attention-unet --lr 0.0003 --missing-sequence 0.75 \
		--epochs 22 --val-every 2 --threads 2 --no-progress
	$(VENV)/bin/brainmets ship --run runs/attention-unet-flair --data $(DATA) --out models/attention-unet
	$(VENV)/bin/brainmets ship --run runs/unetpp --data $(DATA) --out models/unetpp
	$(VENV)/bin/brainmets select --data $(DATA)
	$(VENV)/bin/brainmets compare --data $(DATA)

# Re-tune the shipped models' post-processing and `best` on validation, through the serving engine, without
# retraining (a few minutes), then regenerate docs/results.md.
.PHONY: retune
retune: install
	$(VENV)/bin/brainmets ship --run models/unetpp --data $(DATA) --out models/unetpp
	$(VENV)/bin/brainmets ship --run models/attention-unet --data $(DATA) --out models/attention-unet
	$(VENV)/bin/brainmets select --data $(DATA)
	$(VENV)/bin/brainmets compare --data $(DATA)
