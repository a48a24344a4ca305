# The two commands of the README:
#   make run    set up .venv and fine-tune a small model on a local example
#   make test   set up .venv and run every check CI runs
# Setup installs torch==2.13.0 (CPU) first, then the project with pinned constraints.

VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup run test lint unit crd deploy reliability constraints clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --constraint constraints.txt --editable '.[test]'
	touch $@

run: setup
	$(VENV)/bin/tuneloop validate examples/*.yaml
	$(VENV)/bin/python -m tuneloop_trainer example out/example
	$(VENV)/bin/tuneloop run out/example/job.yaml --output out/example/output

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/tuneloop crd --check
	$(PY) -m tools.render_deploy --check
	$(PY) -m observability --check

test: lint
	$(VENV)/bin/pytest -m "not slow" --durations=25 $(PYTEST_ARGS)

unit: setup
	$(VENV)/bin/pytest -m unit $(PYTEST_ARGS)

crd: setup
	$(VENV)/bin/tuneloop crd

# The reliability suite at its full counts; rewrites the table in docs/reliability.md (tools/reliability.py).
reliability: setup
	$(PY) -m tools.reliability $(PYTEST_ARGS)

# deploy/ is the Helm chart rendered with its defaults (tools/render_deploy.py).
deploy: setup
	$(PY) -m tools.render_deploy

# The header comment, the dev venv's pins, then the image-only section (from its marker line to the
# end: pins of packages this venv never installs, such as bitsandbytes) carried over unchanged.
constraints: setup
	sed -n '/^#/!q;p' constraints.txt > constraints.txt.new
	$(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//' >> constraints.txt.new
	sed -n '/^# Image-only pins/,$$p' constraints.txt >> constraints.txt.new
	@echo "review constraints.txt.new, then move it over constraints.txt"

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .import_linter_cache
