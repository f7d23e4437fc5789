# Two commands on a fresh machine: `make demo` (smoke suite -> leaderboard) and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.detbench-installed
PYTHON  ?= python3

.PHONY: install browser demo imports test test-extended test-fast test-signal bench lock clean

install: $(STAMP)

# The exact versions of requirements.lock (torch 2.14.1 / torchvision 0.29.1 come from the machine's
# local wheels), then detbench itself; `make lock` refreshes the lock from pyproject.toml.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-deps -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# The HTML report's test loads pages in Debian's headless chromium; installs it when missing and
# root, otherwise says why not (never fails: the browser tests then skip).
browser:
	bash .ci/install-browser

demo: $(STAMP)
	$(VENV)/bin/detbench run suites/smoke.yaml

# The layering contracts of pyproject.toml ([tool.importlinter]; docs/architecture.md): an import that
# runs up the layers, a circle, Ray outside harness.sweep or a method reaching past the plugin faces
# fails here with the import named.
imports: $(STAMP)
	$(VENV)/bin/lint-imports --no-logo

# Every test but the extended scenarios (~15 min on 2 cores); CI (.ci/run) runs test-extended after it.
test: $(STAMP) browser imports
	$(PY) -m pytest -q -m "not extended and not signal"

# Killed drivers and workers, a multi-node cluster, the reference recipe, a run on S3 (~25 min).
test-extended: $(STAMP) browser
	$(PY) -m pytest -q -m "extended and not signal"

# The edit-test loop: everything but the tests that start Ray clusters or detbench drivers.
test-fast: $(STAMP) browser imports
	$(PY) -m pytest -q -m "not slow and not signal"

# Every smoke cell learns (AP50 >= 0.30) and falls >= 0.10 with its classification term off (~14 min).
test-signal: $(STAMP)
	$(PY) -m pytest -q -s -m signal tests/test_smoke_signal.py

bench: $(STAMP)
	$(PY) -m benchmarks

# Refresh requirements.lock: a fresh environment resolved from pyproject.toml, frozen. Commit the result.
LOCK_VENV := /tmp/detbench-lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(LOCK_VENV)/bin/python -m pip install -q '.[test]'
	$(LOCK_VENV)/bin/python -m pip install -q --no-deps imagecorruptions-imaug
	(echo "# Exact versions of a detbench environment (make install). Refresh: make lock"; \
	 $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -v '^detbench') > requirements.lock
	rm -rf $(LOCK_VENV)

clean:
	rm -rf results/runs .pytest_cache
