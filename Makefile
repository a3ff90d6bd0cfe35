# Two commands on a fresh machine: `make demo` runs the main job on the embedded synthetic
# world, `make test` runs the tests; each first builds the virtual environment (.venv, or
# VENV=<dir>) the way the README says, once.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: demo track-demo test test-fast test-faults venv

venv: $(VENV)/.installed

# Rebuilt when the dependencies change; constraints.txt pins a torch/torchvision pair.
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -c constraints.txt -e ".[dev]"
	touch $@

demo: venv
	$(PYTHON) -m rts_thaw.train +experiment=staged_fusion

# Slumps through time: an evolving synthetic world (2 sites at 3 dates, 3 years apart) mapped
# with the model `make demo` trained last (or CKPT=<file.ckpt>), tracked, and the tracking scored
# against the world's true lineage. Reruns reuse the world and the maps already made.
LOGS := $(or $(RTS_THAW_LOG_DIR),outputs)
CKPT ?= $(shell ls -t $(LOGS)/staged_fusion/*/checkpoints/best.ckpt 2>/dev/null | head -1)
TRACK_DEMO ?= $(LOGS)/track_demo
track-demo: venv
	@test -n "$(CKPT)" -a -f "$(CKPT)" || { echo "no checkpoint of make demo in $(LOGS)/staged_fusion: run make demo first, or give CKPT=<file.ckpt>"; exit 1; }
	test -f $(TRACK_DEMO)/world/scenes.yaml || $(PYTHON) -m rts_thaw.data.synthetic --out $(TRACK_DEMO)/world \
		--scenes 2 --dates 3 --years-between 3 --seed 1
	$(PYTHON) -m rts_thaw.predict ckpt_path=$(CKPT) scenes=$(TRACK_DEMO)/world/scenes.yaml output_dir=$(TRACK_DEMO)/maps
	$(PYTHON) -m rts_thaw.track 'maps=[$(TRACK_DEMO)/maps/*.gpkg]' output_dir=$(TRACK_DEMO)/tracks
	$(PYTHON) -m rts_thaw.evaluate tracks=$(TRACK_DEMO)/tracks truth=$(TRACK_DEMO)/world \
		output=$(TRACK_DEMO)/tracking_scores.json

# Everything, SLURM included where a cluster runs (tests/slurm/start_cluster.sh); what CI runs.
test: venv
	$(PYTHON) -m pytest -q

# Under 3 minutes on 2 cores: every package, without the long end-to-end runs and SLURM.
test-fast: venv
	$(PYTHON) -m pytest -q -m "not slow and not slurm"

# The fault-injection suite alone: bad inputs, interrupted training and mapping, resumes.
test-faults: venv
	$(PYTHON) -m pytest -q -m faults
