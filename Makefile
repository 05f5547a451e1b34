# make setup   create .venv with every dependency (pinned; see constraints.txt)
# make demo    render the built-in procedural objects with Blender through Ray, then fine-tune the tiny
#              model, stage 1 then stage 2, on the CPU (outputs/demo/; about 5 minutes on 2 cores)
# make test    the test suite (real Blender, real Ray on 127.0.0.1); what CI runs
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU-loadable pair; a later resolver run would otherwise pick another torch
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

DEMO := outputs/demo
demo: setup
	$(PY) pipelines/render_objaverse.py --source demo --output $(DEMO)/render --resolution 64
	$(PY) pipelines/finetune.py --stage 1 --config tiny --data $(DEMO)/render --output $(DEMO)/stage1
	$(PY) pipelines/finetune.py --stage 2 --config tiny --data $(DEMO)/render --output $(DEMO)/stage2 \
		--init $(DEMO)/stage1/checkpoints/step-000200

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/render.py
	$(PY) bench/generate.py
