# load_balancer.py: demo, tests and benchmark.
#   make demo     three example upstreams (8001-8003) + the balancer on 8080, admin on 8081;
#                 Ctrl-C stops everything. Ports: DEMO_LB_PORT, DEMO_ADMIN_PORT, DEMO_UPSTREAM_PORTS.
#   make test     test suite in a local virtualenv (.venv, from requirements-dev.txt), in
#                 TEST_PROCESSES processes (pytest-xdist; 2 by default, 0 for one process); extra
#                 pytest arguments in PYTEST_ARGS, e.g. PYTEST_ARGS="tests/test_proxy.py -x"
#   make bench    benchmark (GET, 8 MiB, idle, admin, WebSocket, HTTPS series; python3 bench/bench.py
#                 --help); extra arguments in BENCH_ARGS="...", e.g. BENCH_ARGS="--baseline OLD_LB.py"
#   make clean    remove the virtualenv and caches

PYTHON ?= python3
VENV ?= .venv
VENV_PYTHON := $(VENV)/bin/python
# Written after a successful install; newer requirements-dev.txt => reinstall.
VENV_STAMP := $(VENV)/.requirements-dev.installed
TEST_PROCESSES ?= 2
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: all demo test bench clean

all: test

demo:
	$(PYTHON) examples/demo.py

test: $(VENV_STAMP)
	$(VENV_PYTHON) -m pytest -n $(TEST_PROCESSES) $(PYTEST_ARGS)

$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV)

$(VENV_STAMP): requirements-dev.txt | $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install --disable-pip-version-check --quiet -r requirements-dev.txt
	touch $@

bench:
	$(PYTHON) bench/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
	find . -path ./.git -prune -o -name __pycache__ -type d -exec rm -rf {} +
