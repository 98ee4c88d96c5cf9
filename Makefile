# make run  - install what is missing, start Azurite and the service on ./var/, print how to start a session
# make test - install what is missing, run the whole suite in a network namespace with only loopback

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
BENCH_INSTALLED := $(VENV)/.bench-installed
AZURITE := node_modules/.bin/azurite-blob

.PHONY: install run test lint bench rclone clean

install: $(INSTALLED) $(AZURITE)

$(INSTALLED): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	@# pyfuse3 compiles against libfuse3; without it the FUSE tests skip and say why.
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[fuse]' \
		|| echo "pyfuse3 could not be installed (needs libfuse3-dev, pkg-config): FUSE tests will skip"
	touch $@

$(AZURITE): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

run: install
	scripts/run-local

test: install
	scripts/in-loopback-netns $(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy

# make bench - the service vs the raw SDK vs rclone on a local Azurite; rewrites benchmarks/RESULTS.md
#              (BENCH_ARGS=--quick for a short run into benchmarks/work/quick/, --help for the rest)
bench: install $(BENCH_INSTALLED) rclone
	scripts/in-loopback-netns $(PY) -m benchmarks $(BENCH_ARGS)

$(BENCH_INSTALLED): $(INSTALLED)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[bench]'
	touch $@

# Debian's rclone, one of the contenders in make bench.
rclone:
	@command -v rclone >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rclone; \
		else \
			echo "make bench needs rclone: sudo apt-get install -y rclone" >&2; exit 1; \
		fi; }

clean:
	rm -rf $(VENV) node_modules var .pytest_cache .ruff_cache .mypy_cache
