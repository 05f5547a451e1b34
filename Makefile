# make setup   create .venv with every dependency (pinned; see constraints.txt)
# make demo    pipelines/demo.py: render the 8 built-in procedural objects with Blender through Ray, fine-tune
#              the tiny model (stage 1, stage 2), turn a seen and a held-out object's image into meshes, evaluate,
#              write outputs/demo-run/report.html (7.5 minutes measured on 2 CPU cores; cached afterwards)
# make base    pipelines/base.py: re-make model/base-tiny, the pre-trained tiny model the demo starts from (48 procedural
#              objects rendered, 5000 training steps: 47 minutes measured on 2 CPU cores)
# make test    the whole test suite (real Blender, real Ray on 127.0.0.1), printing the 15 slowest tests; what CI runs
# make check   the quick tier for the inner loop: the unit tests, no Blender render, no Ray, no training (under a minute)
# make setup-browser  Debian's chromium, for the tests that open report.html and the web app (needs root; CI runs it)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-browser demo base test check bench
setup: $(VENV)/.installed pipelines/web/node_modules/.installed

# <model-viewer> for report.html, pinned by package-lock.json (skipped with a note when npm is missing)
pipelines/web/node_modules/.installed: pipelines/web/package.json pipelines/web/package-lock.json
	@if command -v npm >/dev/null; then cd pipelines/web && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed; \
	else echo "npm not found: report.html will show the turntable instead of the interactive 3D view"; fi

setup-browser:
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# The venv takes 8.4 GB (torch's CUDA libraries 4.1 GB, bpy 0.8 GB, warp 0.4 GB): refuse at once, not mid-install
SETUP_NEEDS_MB ?= 8800
$(VENV)/.installed: pyproject.toml constraints.txt
	@free=$$(df -Pm . | awk 'NR==2 {print $$4}'); if [ "$$free" -lt $(SETUP_NEEDS_MB) ]; then \
	  echo "make setup: $$free MB free on $$(df -P . | awk 'NR==2 {print $$6}'), the venv needs about $(SETUP_NEEDS_MB) MB (SETUP_NEEDS_MB=0 skips this check)"; exit 1; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU-loadable pair; a later resolver run would otherwise pick another torch
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	# rembg imports pymatting, whose numba kernels compile on the first import (about a minute) and are cached
	$(PY) -c "import rembg"
	touch $@

demo: setup
	$(PY) pipelines/demo.py

base: setup
	$(PY) pipelines/base.py

test: setup
	$(PY) -m pytest -q --durations=15

check: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/render.py
	$(PY) bench/generate.py
