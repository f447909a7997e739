# Set-up and checks. `make train` runs the main job (cetnet train: CETNet on MovieLens-100k),
# `make test` the test suite; both create the virtual environment and build the extension first.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch (this project's CI machine has it on local disk).
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CUDA_VENV ?= .venv-cuda
CUDA_TORCH_SPEC ?= torch==2.14.1
CUDA_HOME ?= /usr/local/cuda

# pyproject's [distributed] extra (tests/library/test_packaging.py checks they agree)
DISTRIBUTED_DEPS = fbgemm-gpu-cpu==1.8.0 tensordict==0.15.3 pyre-extensions typing-inspect \
	mypy-extensions iopath cloudpickle pyvers

.PHONY: venv torchrec setup train demo test lint bench wheel cmake-test cuda-build-check triton-oldest-test gpu-check ci clean

# Stamps in the venv make `make test` / `make train` start at once when nothing changed: the
# environment is re-checked when this Makefile changes, the extension rebuilt when csrc/,
# setup.py or pyproject.toml change (or the built module is gone). `make clean` forgets both.
VENV_STAMP := $(VENV)/.cetnet-venv
SETUP_STAMP := $(VENV)/.cetnet-setup
BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
# Rebuild when the compiled module is missing even if the stamp is newer than the sources.
REBUILD := $(if $(wildcard cetnet_kernels/_C*.so),,FORCE)

venv: $(VENV_STAMP)
setup: $(SETUP_STAMP)

# The environment: torch (CPU), the build tools, the test and benchmark tools; TensorBoard's
# writer for the runs' event files (optional: runs skip it when absent). torchrec for the
# KeyedJaggedTensor interop tests (not a dependency of cetnet): its own requirements would pull
# fbgemm-gpu and another torch, so no deps, plus the pure-Python ones and fbgemm-gpu-cpu 1.8.0
# (the FBGEMM CPU build made for torch 2.13, which torchrec imports). FuxiCTR for the peer rows
# of `cetnet reproduce` (cetnet.reproduce.peers; not a dependency of cetnet), also without its
# deps (they pull ray[data], used only by its dataset building, which the peer does not use),
# plus what its trainer, layers and metrics import (polars, h5py, scikit-learn). Optuna (and the
# PostgreSQL driver) for `cetnet search`.
$(VENV_STAMP): Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q setuptools wheel ninja numpy "triton>=3.6" pytest hypothesis expecttest \
		pytest-benchmark matplotlib pyyaml tqdm
	$(PIP) install -q tensorboard || echo "tensorboard not installable: runs write no event files"
	$(PIP) install -q --no-deps torchrec==1.9.2 $(DISTRIBUTED_DEPS) portalocker \
		|| echo "torchrec not installable: the KeyedJaggedTensor tests will be skipped"
	$(PIP) install -q --no-deps fuxictr==2.3.10 \
		|| echo "fuxictr not installable: the FuxiCTR peer tests will be skipped"
	$(PIP) install -q polars h5py scikit-learn \
		|| echo "polars/h5py/scikit-learn not installable: the FuxiCTR peer tests will be skipped"
	$(PIP) install -q "optuna>=4.9" scipy psycopg2-binary \
		|| echo "optuna not installable: the cetnet search tests will be skipped"
	touch $@

# ... plus this package, its extension built against that torch (every CPU kernel build:
# default, avx2, avx512; CETNET_CPU_ISA=native builds only the widest this machine runs).
$(SETUP_STAMP): $(VENV_STAMP) $(BUILD_INPUTS) $(REBUILD)
	$(PIP) install -q --no-build-isolation -e .
	touch $@

# TorchRec for `embedding: torchrec` in an environment of your own: the [distributed] extra
# (FBGEMM's CPU build, torchrec's pure-Python requirements), then torchrec without its
# requirements (they name the CUDA fbgemm-gpu and another torch). `make venv` does the same.
# (A user of the wheel: pip install "cetnet[distributed]"; pip install --no-deps torchrec==1.9.2.)
torchrec: venv
	$(PIP) install -q $(DISTRIBUTED_DEPS)
	$(PIP) install -q --no-deps torchrec==1.9.2

FORCE:

train: setup
	$(PY) -m cetnet train

demo: setup
	$(PY) -m cetnet.demo

test: setup
	$(PY) -m pytest -q

# ruff (pyflakes' checks, syntax errors) over everything; mypy over the two packages (the public
# API's annotations must hold: configured in pyproject.toml)
lint: venv
	$(PIP) install -q "ruff==0.17.6" "mypy==2.4.1"
	$(PY) -m ruff check cetnet_kernels python bench tests examples setup.py
	$(PY) -m mypy

bench: setup
	$(PIP) install -q "fbgemm-gpu-cpu==1.8.0" || echo "fbgemm-gpu-cpu not installable: FBGEMM rows skipped"
	$(PY) -m pytest bench/bench_fusion.py --benchmark-json=bench/fusion_cpu.json
	$(PY) bench/render.py bench/fusion_cpu.json --readme README.md

# A wheel that installs and runs on any x86-64 CPU with the same torch (every CPU kernel build
# inside; the widest the CPU runs is picked at import) -> dist/.
wheel: venv
	$(PIP) wheel -q --no-build-isolation --no-deps -w dist .
	ls dist/cetnet-*.whl

# The same csrc/ built against libtorch with CMake, plus the C++ test through the dispatcher.
cmake-test: venv
	cmake -S . -B build-cmake -DCMAKE_BUILD_TYPE=Release -DCETNET_CPU_ISA=$${CETNET_CPU_ISA:-avx2} \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build build-cmake -j2
	cd build-cmake && ctest --output-on-failure

# Compiles the CUDA kernels (nothing runs: no GPU needed) against a CUDA build of torch.
cuda-build-check:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q "$(CUDA_TORCH_SPEC)" setuptools wheel ninja numpy
	rm -rf build-cuda
	CETNET_CUDA=1 CETNET_CPU_ISA=$${CETNET_CPU_ISA:-default} CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-9.0}" \
	CPLUS_INCLUDE_PATH="$$($(CUDA_VENV)/bin/python -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "include"))')" \
	MAX_JOBS=2 $(CUDA_VENV)/bin/python setup.py -q build_ext --build-temp build-cuda/tmp --build-lib build-cuda/lib
	ls build-cuda/lib/cetnet_kernels/_C*.so

# The Triton kernels (interpreter, CPU) under the oldest Triton the project supports, 3.6 (the
# GPU image's), beside the same torch and the extension built by `make setup`. Triton 3.6's
# interpreter needs numpy < 2.3 (it calls int() on 1-element arrays, an error from numpy 2.3 on).
TRITON_OLDEST_VENV ?= .venv-triton36
triton-oldest-test:
	ls cetnet_kernels/_C*.so >/dev/null 2>&1 || $(MAKE) setup  # the extension, built once
	test -x $(TRITON_OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_OLDEST_VENV)
	$(TRITON_OLDEST_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" "triton==3.6.0" "numpy<2.3" \
		pytest hypothesis expecttest pyyaml
	PYTHONPATH=$(CURDIR):$(CURDIR)/python $(TRITON_OLDEST_VENV)/bin/python -m pytest -q \
		-p no:cacheprovider --disable-warnings tests/kernels/test_triton_fusion.py tests/kernels/test_embedding_backends.py \
		tests/kernels/test_fusion_ops.py tests/kernels/test_fusion_limits.py tests/kernels/test_kdef_ops.py tests/kernels/test_kdef_triton.py \
		tests/kernels/test_triton_compile.py tests/kernels/test_embedding_bounds_check.py \
		tests/kernels/test_embedding_hot_rows.py -k triton

# On a machine with an NVIDIA GPU and torch (CUDA) + Triton already installed, no internet needed:
# CUDA build for the local arch, GPU benchmarks, compute-sanitizer, every CUDA/Triton test ->
# bench/GPU_RESULTS.md, within an 8-minute budget (570 s at most); with $OUT set, also
# $OUT/gpu-check.tgz + the report, rewritten after every step. Uses $(PYTHON) as it is (no
# venv). Exit 2 at once without a GPU.
gpu-check:
	$(PYTHON) bench/gpu_check.py

ci: lint test triton-oldest-test cmake-test cuda-build-check

clean:
	rm -rf build build-cmake build-cuda dist *.egg-info cetnet_kernels/_C*.so $(VENV_STAMP) $(SETUP_STAMP)
