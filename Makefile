# Two commands do everything on a fresh machine with Python 3.11:
#   make demo   set up .venv, then personalize a rendered 3D head on the committed small base EG3D (CPU, minutes)
#   make test   set up .venv, then run the whole test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

.PHONY: setup browser demo test clean-demo

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt setup.py
	@echo "==> creating virtual environment in $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> installing pinned dependencies (requirements.txt, requirements-dev.txt)"
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	@echo "==> installing this project in editable mode"
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@

demo: setup
	@echo "==> running the demo: eg3d/demo.py"
	$(PY) eg3d/demo.py

# The viewer's browser test (tests/test_viewer.py) drives Debian's Chromium. When chromium or chromedriver is
# missing and we are root with apt-get (CI), install them (about 25 s, 380 MB; docs/viewer.md); otherwise that test skips.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "==> installing chromium and chromium-driver for the viewer's browser test (apt-get)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
			|| echo "==> apt-get could not install chromium: the viewer's browser test will skip"; \
	else echo "==> no chromium/chromedriver and not root with apt-get: the viewer's browser test will skip"; fi

test: setup browser
	@echo "==> running the test suite"
	$(PY) -m pytest tests -q

clean-demo:
	rm -rf datasets/demo datasets/demo-heldout datasets/demo-groundtruth runs/demo
