# Set-up, demo and tests. Every target creates the virtual environments it needs first (idempotent).
# .venv: the bundle, its tests and benchmarks. .venv-label: the MONAI Label app (numpy<2).
# .venv-deploy: the MONAI Deploy app (App SDK, Holoscan).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LABEL_STAMP := .venv-label/.installed
DEPLOY_STAMP := .venv-deploy/.installed
SHARED_STAMP := .venv-deploy/.shared

.PHONY: setup setup-label setup-deploy share-environments demo test

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(LABEL_STAMP): requirements-label.txt pyproject.toml
	test -x .venv-label/bin/python || $(PYTHON) -m venv .venv-label
	.venv-label/bin/python -m pip install --upgrade pip
	.venv-label/bin/python -m pip install -r requirements-label.txt
	.venv-label/bin/python -m pip install --no-deps --no-build-isolation -e .
	touch $(LABEL_STAMP)

$(DEPLOY_STAMP): requirements-deploy.txt apps/deploy/requirements.txt requirements-dev.txt requirements.txt pyproject.toml
	test -x .venv-deploy/bin/python || $(PYTHON) -m venv .venv-deploy
	.venv-deploy/bin/python -m pip install --upgrade pip
	.venv-deploy/bin/python -m pip install -r requirements-deploy.txt
	.venv-deploy/bin/python -m pip install --no-deps --no-build-isolation -e .
	touch $(DEPLOY_STAMP)

setup: $(STAMP)

setup-label: $(LABEL_STAMP)

setup-deploy: $(DEPLOY_STAMP)

# The three environments install the same torch, triton and CUDA wheels (about 5.5 GB each): util-linux's hardlink
# turns each set of identical files into one (about 11 GB less on disk). Installing into an environment later
# replaces files rather than writing into them, so the environments stay independent.
$(SHARED_STAMP): $(STAMP) $(LABEL_STAMP) $(DEPLOY_STAMP)
	if command -v hardlink >/dev/null; then \
		hardlink --quiet --ignore-time --respect-name --minimum-size 1M .venv*/lib/python3*/site-packages; \
	else \
		echo "hardlink (util-linux) not found: each environment keeps its own copy of torch"; \
	fi
	touch $(SHARED_STAMP)

share-environments: $(SHARED_STAMP)

demo: setup
	$(PY) -m custom_ops.build
	cd bundles/cellvta && ../../$(PY) -m scripts.demo --out ../../outputs/demo

test: setup setup-label setup-deploy share-environments
	$(PY) -m pytest
