# saferclip — one set-up command, one main job, one test command (see README.md).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ACT := source $(VENV)/bin/activate &&
PROFILE ?= world
FULL ?= False

STAMP := $(VENV)/.saferclip-setup

.PHONY: setup data reproduce base generators test test-nbs test-py bench clean-cache readme

## setup: virtualenv + package (editable) + dev tools + the Fashion-MNIST Debian package when root/apt exist.
## Every target below depends on it; it re-runs only when setup.py / settings.ini change (or the venv is gone).
$(STAMP): setup.py settings.ini
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[dev,paper,generation]"
	$(MAKE) --no-print-directory data
	touch $(STAMP)

setup: $(STAMP)

data:
	@if [ -d /usr/share/datasets/fashion-mnist ] || [ -n "$$SAFERCLIP_DATA" ]; then echo "fashion-mnist: present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null && echo "fashion-mnist: installed"; \
	else echo "fashion-mnist: not installed; run 'sudo apt-get install -y dataset-fashion-mnist' or set SAFERCLIP_DATA"; fi

## reproduce: the main job on the embedded offline world (PROFILE=paper for ViT-L-14 + ViSU; FULL=True adds seeds + sweeps)
reproduce: $(STAMP)
	$(ACT) python -m saferclip.reproduce --profile $(PROFILE) --full $(FULL)

## base: re-pretrain the shipped world base from scratch (about an hour on 2 cores) and print its premise report
## beside the shipped one's; `python -m saferclip.base --install --results results` replaces the shipped file
base: $(STAMP)
	$(ACT) python -m saferclip.base

## generators: retrain the world's text-to-image model, captioner and judge on the shipped base (about an hour on
## 2 cores) and install them over the shipped files in saferclip/weights/ (nbs/06_world_generation.ipynb)
generators: $(STAMP)
	$(ACT) python -m saferclip.worldgen --install

## test: every notebook (nbdev_test, slow cells skipped) and the pytest suite
test: $(STAMP)
	$(MAKE) --no-print-directory test-nbs test-py

test-nbs:
	$(ACT) nbdev_test --n_workers 2

test-py:
	$(ACT) python -m pytest -q tests

bench: $(STAMP)
	$(ACT) for b in benchmarks/*.py; do python $$b || exit 1; done

clean-cache:
	rm -rf data runs

readme:
	$(ACT) python -c "from saferclip.reproduce import write_readme; write_readme('.')"
