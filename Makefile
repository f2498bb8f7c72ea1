# One entry for installing, the main job and the tests. Everything lives in .venv at the repository root.
# CPU machines (default):  make install
# GPU machines:            make install FBGEMM=fbgemm-gpu==1.8.0 CONSTRAINTS=requirements/constraints-gpu.txt \
#                              TORCH_INDEX=--extra-index-url=https://download.pytorch.org/whl/cu128
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
FBGEMM ?= fbgemm-gpu-cpu==1.8.0
CONSTRAINTS ?= requirements/constraints-cpu.txt
TORCH_INDEX ?=
PYTEST_ARGS ?=

EXPERIMENT ?= configs/experiments/ml-100k-lightgcn.yaml

.PHONY: install demo test experiment

install: $(VENV)/.installed

# torchrec's metadata requires the CUDA fbgemm-gpu, which pip would pull over the CPU build:
# install it with --no-deps after its real requirements (listed in pyproject.toml).
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(CONSTRAINTS) $(TORCH_INDEX) torch==2.13.0 $(FBGEMM)
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[test]'
	$(PIP) install -q --no-deps torchrec==1.8.0
	$(PY) -c "import torchrec, fbgemm_gpu, deepspeed, pyspark, webdataset; print('install ok')"
	touch $@

# The main job: prepare MovieLens-100K once (redone when its config or the dataset layout changes), then train and compare.
demo: install data/ml-100k/manifest.json
	$(PY) launch/experiment.py configs/experiments/quickstart.yaml

data/ml-100k/manifest.json: configs/data/ml-100k.yaml darec_dist/data/layout.py | install
	$(PY) -m spark_jobs.prepare configs/data/ml-100k.yaml overwrite=true

experiment: install
	$(PY) launch/experiment.py $(EXPERIMENT)

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)
