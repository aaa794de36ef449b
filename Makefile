# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is
# missing, install requirements.txt once (again only when it changes), and reuse it afterwards.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
DEMO_DIR ?= demo_output
TEST_WORKERS ?= 2

.PHONY: demo test venv clean-demo

venv: $(STAMP)

# pip shows its own progress (a line per package, download bars on a terminal) instead of
# running silently for minutes; the full pip log goes to $(VENV)/pip-install.log.
$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing requirements.txt into $(VENV) (first time: a few minutes; log: $(VENV)/pip-install.log)"
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar on --log $(VENV)/pip-install.log -r requirements.txt
	@cp requirements.txt $(STAMP)

# Lint first (ruff.toml): a style or unused-name error fails fast, before the long suite.
# Most tests keep one core busy, so the suite runs on TEST_WORKERS pytest-xdist processes, a test
# file per worker at a time (a file's module fixtures, such as a trained model, are built once).
# `make test TEST_WORKERS=0` runs it in this one process.
test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# `make demo VERBOSE=1` also shows every line of the steps' logs (TensorFlow, Beam, KFP).
demo: venv
	$(PY) -m pipelines.demo --output $(DEMO_DIR) $(if $(VERBOSE),--verbose)

clean-demo:
	rm -rf $(DEMO_DIR)
