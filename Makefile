# Two commands on a fresh machine:  make demo   |   make test
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# CPU build of torch first, pinned, so no later step pulls a CUDA build.
	# GPU users: install the torch build for your CUDA before `pip install -e .[gpu]`.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev,atari,3d]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m unified_wm.cli demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
