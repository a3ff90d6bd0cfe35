# Two commands on a fresh machine: `make demo` runs the main job on the embedded synthetic
# world, `make test` runs the tests; each first builds the virtual environment (.venv, or
# VENV=<dir>) the way the README says, once.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: demo test test-fast test-faults venv

venv: $(VENV)/.installed

# Rebuilt when the dependencies change; constraints.txt pins a torch/torchvision pair.
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -c constraints.txt -e ".[dev]"
	touch $@

demo: venv
	$(PYTHON) -m rts_thaw.train +experiment=staged_fusion

# Everything, SLURM included where a cluster runs (tests/slurm/start_cluster.sh); what CI runs.
test: venv
	$(PYTHON) -m pytest -q

# Under 3 minutes on 2 cores: every package, without the long end-to-end runs and SLURM.
test-fast: venv
	$(PYTHON) -m pytest -q -m "not slow and not slurm"

# The fault-injection suite alone: bad inputs, interrupted training and mapping, resumes.
test-faults: venv
	$(PYTHON) -m pytest -q -m faults
