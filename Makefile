# Two commands on a fresh machine:  make demo   |   make test
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean browser

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# CPU build of torch first, pinned, so no later step pulls a CUDA build.
	# GPU users: install the torch build for your CUDA before `pip install -e .[gpu]`.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev,atari,3d,metrics]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m unified_wm.cli demo

# Debian's chromium for the browser test (tests/test_play.py). A no-op when chromium is present;
# without apt-get or root it only says so (that test then skips with the reason), never fails.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif ! command -v apt-get >/dev/null 2>&1 || [ "$$(id -u)" != 0 ]; then \
	  echo "note: chromium is not installed and apt-get as root is not available; the browser test will skip"; \
	else \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "note: could not install chromium with apt-get; the browser test will skip"; \
	fi

# The suite runs in PYTEST_WORKERS processes (pytest-xdist), one test file per worker at a time:
# most tests use one core, and each worker builds the shared fixtures once. PYTEST_WORKERS=0
# runs it in this process.
PYTEST_WORKERS ?= 2
test: $(STAMP) browser
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

clean:
	rm -rf runs .pytest_cache
