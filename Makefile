# `make run` and `make test` are the whole set-up: both install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install run test

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

# Retrain, evaluate and ship both models as shipped in models/ (about 80 minutes on 2 CPU cores: the two
# networks train side by side, one core each), tune the ensemble, pick `best` on validation, then regenerate
# docs/results.md.
DATA ?= ../shared/data/lgg
BUDGET ?= 80
.PHONY: models
models: install
	$(VENV)/bin/brainmets split --data $(DATA) --out runs/split.json
	$(VENV)/bin/brainmets train --data $(DATA) --model attention-unet --split runs/split.json --out runs/attention-unet \
		--epochs 30 --threads 1 --time-budget $(BUDGET) --no-progress & \
	$(VENV)/bin/brainmets train --data $(DATA) --model unetpp --split runs/split.json --out runs/unetpp \
		--epochs 16 --threads 1 --time-budget $(BUDGET) --no-progress & \
	wait
	$(VENV)/bin/brainmets ship --run runs/attention-unet --data $(DATA) --out models/attention-unet
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
