# sophia-lab: set-up, tests, demo. Everything installs into .venv in the repo root.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A CPU wheel of this torch lies on the development machines; pinning it here keeps pip from
# choosing a multi-GB CUDA build. pyproject keeps a range for real users.
TORCH_PIN := torch==2.13.0

.PHONY: setup test test-all test-triton demo lint bench-step clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e ".[all]" $(TORCH_PIN)
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -n 2 src tests

test-all: setup
	$(BIN)/python -m pytest -q -n 2 -m "slow or not slow" src tests

# The Triton kernel's tests under Triton's interpreter, on CPU tensors (no GPU needed). Triton (about 0.9 GB)
# goes into its own folder, outside the venv and the default suite, which skip these tests without it.
TRITON_PIN := triton==3.8.0
test-triton: setup
	test -d .triton || $(BIN)/python -m pip install -q --no-deps --target .triton $(TRITON_PIN)
	PYTHONPATH=.triton TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/optim/test_triton_kernel.py

demo: setup
	$(BIN)/sophia demo

lint: setup
	$(BIN)/ruff check src tests benchmarks

bench-step: setup
	$(BIN)/sophia bench step --out-dir runs/bench-step --overwrite

clean:
	rm -rf $(VENV) .triton build *.egg-info src/*.egg-info
