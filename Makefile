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
	$(PY) -m pip install --quiet -e '.[dev,perf,torch,ucx]'
	touch $(STAMP)

# The main job: a broker with a pub/sub demo and its live stats (everything it
# starts is stopped), then tensorbus beside its peers, latency and throughput,
# for small messages and for tensors (copy-in and loaned, beside memcpy).
# In between, two DDP trainers under torchrun train through two parameter-
# server shards (examples/ddp_demo.py), with the live stats view.
demo: $(STAMP)
	$(PY) examples/pubsub_demo.py --seconds 4
	$(PY) examples/ddp_demo.py --steps 300
	$(PY) perf/perf.py lat --backend bus,ring,zmq,nats,redis,iox2 --size 64
	$(PY) perf/perf.py thr --backend bus,ring,zmq --size 64
	$(PY) perf/perf.py thr --backend bus,bus-loan,memcpy,shm,zmq --size 64MiB --count 100
	$(PY) perf/perf.py lat --backend bus-loan,shm,zmq --size 4KiB --count 5000
	$(PY) perf/perf.py lat --backend bus-loan,shm --size 256MiB --count 100
	$(PY) perf/perf.py ddp --backend allreduce,ps_hook,ps_hook_fp16
	$(PY) perf/perf.py lat --backend req-bus,req-zmq,req-nats --size 64
	$(PY) perf/perf.py thr --backend bridge-ucx,bridge-tcp,ucx,ucx-shm,zmq-tcp --size 64MiB --count 40
	$(PY) perf/perf.py lat --backend bridge-ucx,bridge-tcp,ucx,zmq-tcp --size 64 --count 5000

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info _core/*.c _core/*.so
