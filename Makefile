# Two commands do everything on a fresh machine:
#   make quickstart   the main job (creates .venv on first use)
#   make test         lint + tests (creates .venv on first use)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: quickstart test lint venv clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[train,dev]'
	touch $(STAMP)

venv: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/smart-turn-mm quickstart

lint: $(STAMP)
	$(VENV)/bin/ruff check smart_turn_mm tests benchmarks *.py
	$(VENV)/bin/ruff format --check smart_turn_mm tests benchmarks *.py

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
