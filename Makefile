# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is
# missing, install requirements.txt once (again only when it changes), and reuse it afterwards.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
DEMO_DIR ?= demo_output

.PHONY: demo test venv clean-demo

venv: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@cp requirements.txt $(STAMP)

test: venv
	$(PY) -m pytest tests

demo: venv
	$(PY) -m pipelines.demo --output $(DEMO_DIR)

clean-demo:
	rm -rf $(DEMO_DIR)
