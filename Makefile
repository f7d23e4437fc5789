# Two commands on a fresh machine: `make demo` (smoke suite -> leaderboard) and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.detbench-installed
PYTHON  ?= python3

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

# torch/torchvision pinned and installed first: pip takes them from the machine's local wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps imagecorruptions-imaug
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/detbench run suites/smoke.yaml

test: $(STAMP)
	$(PY) -m pytest -q

# The edit-test loop: everything but the tests that start Ray clusters or detbench drivers.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf results/runs .pytest_cache
