# Two commands for a fresh machine (each sets itself up: venv, dependencies, extension build):
#   make demo    the main job
#   make test    the whole test suite (builds the CPU + CUDA extension, checks the CMake build)
# Also: make bench (microbenchmarks), make build.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 is a CUDA build that also runs on the CPU: the extension's CUDA sources are
# compiled and linked against it even on machines without a GPU.
TORCH ?= torch==2.14.1
DEPS := triton==3.8.0 numpy tqdm ninja pytest pytest-benchmark scikit-learn scipy matplotlib transformers datasets faiss-cpu
CUDA_HOME ?= /usr/local/cuda
# CMake is checked against the CPU wheel (find_package(Torch) of a CUDA wheel needs a full
# CUDA toolkit with libraries, which pip's nvidia packages do not lay out for CMake).
CMAKE_VENV ?= .venv-cmake
CMAKE_TORCH ?= torch==2.13.0
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py CMakeLists.txt

.PHONY: build test demo bench cmake-check

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH) $(DEPS)
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=2 \
	CPATH="$$($(PY) -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__path__[0]), "nvidia", "cu13", "include"))')" \
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

$(CMAKE_VENV)/.deps:
	$(PYTHON) -m venv $(CMAKE_VENV)
	$(CMAKE_VENV)/bin/python -m pip install -q --disable-pip-version-check $(CMAKE_TORCH) numpy cmake ninja
	touch $@

# Built portable (no -march=native): the smoke test then runs the kernels' paths for CPUs
# without AVX-512 (portable outer-product block, transposing sketch) against the reference.
cmake-check: $(CMAKE_VENV)/.deps
	$(CMAKE_VENV)/bin/cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DGRASS_KERNELS_PORTABLE=ON \
	  -DCMAKE_MAKE_PROGRAM=$(CURDIR)/$(CMAKE_VENV)/bin/ninja \
	  -DCMAKE_PREFIX_PATH="$$($(CMAKE_VENV)/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	$(CMAKE_VENV)/bin/cmake --build build/cmake
	$(CMAKE_VENV)/bin/python tests/cmake_smoke.py build/cmake/libgrass_kernels.so

test: build cmake-check
	$(PY) -m pytest

demo: build
	$(PY) -m grass demo

bench: build
	$(PY) -m bench
