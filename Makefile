# Everything runs in a local virtual environment built from this repo's files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := pyproject.toml setup.py $(wildcard _core/*.pyx _core/*.pxd _core/*.h)

.PHONY: demo demo-smoke test lint perf reliability bridge-targets clean

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,perf,torch,ucx]'
	touch $(STAMP)

# The main job: a broker with a pub/sub demo and its live stats (everything it
# starts is stopped), two DDP trainers under torchrun through two parameter-
# server shards, then tensorbus beside its peers, latency and throughput, for
# small messages and for tensors; plots under perf/results/. The stages are
# listed once, in perf/demo.py; demo-smoke runs each of them at small counts
# (CI: under 3 minutes on 2 cores) and fails on a peer it cannot run.
demo: $(STAMP)
	$(PY) perf/demo.py

demo-smoke: $(STAMP)
	$(PY) perf/demo.py --smoke

test: $(STAMP)
	$(PY) -m pytest

# What survives kill -9 of a client (R1) and of the daemon (R2), one stalled
# subscriber of 8 (R4) and a 10-minute soak at 100k msgs/s (R6), at full
# sizes: about 20 minutes on 2 cores; exits 1 if a target was missed
# (docs/reliability.md). tests/test_reliability.py runs them at CI sizes.
reliability: $(STAMP)
	$(PY) perf/reliability.py all

# The bridge's targets (docs/bridge.md, "Performance"): round trips, one-way
# rates, 64 MiB on huge pages (as root it reserves and restores them) and DDP
# through two daemons, each beside its peer in one run; exits 1 on a miss.
bridge-targets: $(STAMP)
	$(PY) perf/bridge_targets.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info _core/*.c _core/*.so
