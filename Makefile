# The two commands of the README: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch for dev and CI machines (an unpinned torch pulls a multi-GB CUDA build).
# On a GPU box, install the torch that matches its CUDA first and run `make setup TORCH=`.
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Wheels bundled into the Blender extension (pyzmq, msgpack for cp311/cp313; plyfile), fetched once.
.cache/extension_wheels/.fetched: scripts/build_extension.py | $(VENV)/.installed
	$(PY) scripts/build_extension.py --fetch-wheels --no-build
	touch $@

setup: $(VENV)/.installed .cache/extension_wheels/.fetched

# Procedural scene -> reconloop serve -> the extension's Reconstruct in Blender -> demo_out/demo_result.blend
demo: setup
	$(PY) scripts/demo.py --out demo_out

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	# Two workers on two cores: one torch/OpenMP thread each, or they fight over the cores.
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadgroup -q

clean:
	rm -rf $(VENV) demo_out build dist *.egg-info
