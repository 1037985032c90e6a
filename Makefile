# Two commands do everything on a fresh machine (each creates the venv when it is missing):
#   make demo   set up, then export the embedded default model (stories260k) to out/default, benchmark it and
#               continue a prompt with it
#   make test   set up, then run the test suite (what .ci/run runs)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/edgepack export --target cpu -o out/default --force
	$(VENV)/bin/edgepack inspect out/default
	$(VENV)/bin/edgepack bench out/default --threads 2 --runs 3
	$(VENV)/bin/edgepack generate out/default --prompt "Once upon a time" --max-new-tokens 48

test: setup
	$(VENV)/bin/pytest -q
