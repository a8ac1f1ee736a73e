# Everything runs in a local virtual environment built from this repo's files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := pyproject.toml setup.py $(wildcard _core/*.pyx _core/*.pxd _core/*.h)

.PHONY: demo test lint perf clean

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,perf]'
	touch $(STAMP)

# The main job: tensorbus's ring beside its peers, latency and throughput.
demo: $(STAMP)
	$(PY) perf/perf.py lat --backend ring,zmq,mp,iox2 --size 64
	$(PY) perf/perf.py thr --backend ring,zmq,mp,iox2 --size 64

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info _core/*.c _core/*.so
