# The two commands of the README: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch for dev and CI machines, pinned to the tested version. Our machines' pip index holds its CPU build; on
# Linux, pypi.org's torch is the multi-GB CUDA build: TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the
# CPU one there. On a GPU box, install the torch that matches its CUDA first and run `make setup TORCH=`.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: setup demo test lint clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "$(PYTHON) is Python %d.%d; the demo and the tests need 3.11 (the bpy wheel'"'"'s): make PYTHON=python3.11 ..." % sys.version_info[:2])'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)")
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
