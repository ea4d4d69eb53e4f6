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

.PHONY: demo test lint pytest clean overlays webui-test

$(VENV)/.standalone: requirements/engine.txt requirements/standalone.txt requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(CONSTRAINTS) torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q $(CONSTRAINTS) -r requirements/standalone.txt
	touch $@

$(VENV)/.dev: $(VENV)/.standalone requirements/dev.txt requirements/ui.txt requirements/dev-nodeps.txt
	$(PIP) install -q $(CONSTRAINTS) -r requirements/dev.txt
	# Stability AI's original ldm package, as A1111 runs it; its own pins would downgrade half the venv.
	$(PIP) install -q --no-deps -r requirements/dev-nodeps.txt
	touch $@

# The tab's browser tests also run on gradio 3.41.2 (A1111) and 4.40.0 (Forge). Each lives in an overlay
# folder that tests/standins/ui_servers.py puts in front of .venv with PYTHONPATH, so torch is not installed
# again; --no-deps, so the overlay holds only what that gradio needs older (or .venv lacks). 3.41.2 needs
# fastapi 0.94 / pydantic 1 / httpx 0.24; 4.40.0 imports huggingface_hub.HfFolder (gone in huggingface_hub 1),
# and transformers 5 / diffusers 0.42 refuse huggingface_hub < 1, so that overlay also holds Forge's own
# huggingface_hub 0.26.2, transformers 4.46.1, tokenizers 0.20.3 and diffusers 0.31.0.
OVERLAYS := .venv-gradio3/.stamp .venv-gradio4/.stamp
.venv-gradio%/.stamp: requirements/gradio%-overlay.txt | $(VENV)/.standalone
	rm -rf .venv-gradio$*
	$(PIP) install -q --no-deps --target .venv-gradio$* -r $<
	touch $@

overlays: $(OVERLAYS)

# Debian's chromium for Playwright (never `playwright install`: it downloads a browser build).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get update -qq && apt-get install -y -qq chromium

demo: $(VENV)/.standalone
	$(PY) -m lora_trainer demo

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/vermin --target=3.10- --violations --no-tips --eval-annotations lora_trainer scripts install.py

pytest: $(VENV)/.dev $(OVERLAYS) $(CHROMIUM)
	$(VENV)/bin/pytest -q

test: lint pytest

# The real-WebUI suite (not in CI: the WebUIs' code is fetched, never committed). Build the installs once with
# tests/real_webui/build_a1111.sh and build_forge.sh (they need the snapshots those scripts name), then:
#   make webui-test A1111_DIR=/work/webuis/a1111 FORGE_DIR=/work/webuis/forge
# It writes tests/real_webui/REPORT.md and the README's screenshots (docs/screenshot_a1111.png, screenshot_forge.png).
A1111_DIR ?= /work/webuis/a1111
FORGE_DIR ?= /work/webuis/forge
webui-test: $(VENV)/.dev $(CHROMIUM)
	OMP_NUM_THREADS=1 $(PY) tests/real_webui/suite.py --a1111 $(A1111_DIR) --forge $(FORGE_DIR) --update-screenshots

clean:
	rm -rf $(VENV) demo_output output .venv-gradio3 .venv-gradio4 test-artifacts
