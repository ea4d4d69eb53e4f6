# The two commands of the README:
#   make demo   installs the standalone requirements into .venv and runs the offline demo
#   make test   installs the test requirements into .venv, lints, and runs the tests
# torch comes from the CPU-capable pair pinned in requirements/constraints.txt; every other
# install is constrained to it so pip never pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
CONSTRAINTS := -c requirements/constraints.txt

.PHONY: demo test lint pytest clean

$(VENV)/.standalone: requirements/engine.txt requirements/standalone.txt requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(CONSTRAINTS) torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q $(CONSTRAINTS) -r requirements/standalone.txt
	touch $@

$(VENV)/.dev: $(VENV)/.standalone requirements/dev.txt requirements/dev-nodeps.txt
	$(PIP) install -q $(CONSTRAINTS) -r requirements/dev.txt
	# Stability AI's original ldm package, as A1111 runs it; its own pins would downgrade half the venv.
	$(PIP) install -q --no-deps -r requirements/dev-nodeps.txt
	touch $@

demo: $(VENV)/.standalone
	$(PY) -m lora_trainer demo

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/vermin --target=3.10- --violations --no-tips --eval-annotations lora_trainer

pytest: $(VENV)/.dev
	$(VENV)/bin/pytest -q

test: lint pytest

clean:
	rm -rf $(VENV) demo_output output
