"""The backend resolution rules for every install: CPU-only build, CUDA build, no native
library, no Triton. The availability facts are injected into ``_backend.choose`` (the function
``resolve`` calls with this install's facts), so every combination is checked without a GPU."""

from __future__ import annotations

import itertools

import pytest
import torch

import grass_kernels as gk
from grass_kernels import _backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
CUDA_OPS = [op for op in _backend.OPS if op not in _backend.NO_CUDA_KERNEL]
TRITON_PREFERRED = [op for op in _backend.OPS if _backend.PREFERRED_GPU[op] == "triton"]

CUDA_BUILD = _backend.Available(native=True, cuda_kernels=True, triton=True)
CPU_BUILD = _backend.Available(native=True, cuda_kernels=False, triton=True)
CUDA_BUILD_NO_TRITON = _backend.Available(native=True, cuda_kernels=True, triton=False)
CPU_BUILD_NO_TRITON = _backend.Available(native=True, cuda_kernels=False, triton=False)
NO_NATIVE = _backend.Available(native=False, cuda_kernels=False, triton=True)
NOTHING = _backend.Available(native=False, cuda_kernels=False, triton=False)


@pytest.mark.parametrize("op", _backend.OPS)
def test_cuda_build_with_triton_uses_the_preferred_backend(op):
    assert _backend.choose(op, CUDA, None, CUDA_BUILD) == _backend.PREFERRED_GPU[op]
    assert _backend.choose(op, CPU, None, CUDA_BUILD) == "cpu"


@pytest.mark.parametrize("available", [CPU_BUILD, NO_NATIVE], ids=["cpu-build", "no-native"])
@pytest.mark.parametrize("op", _backend.OPS)
def test_without_cuda_kernels_the_gpu_default_is_triton(op, available):
    assert _backend.choose(op, CUDA, None, available) == "triton"


@pytest.mark.parametrize("op", CUDA_OPS)
def test_cuda_build_without_triton_uses_cuda_kernels_everywhere_they_exist(op):
    assert _backend.choose(op, CUDA, None, CUDA_BUILD_NO_TRITON) == "cuda"


@pytest.mark.parametrize("op", TRITON_PREFERRED)
def test_cuda_build_without_triton_refuses_triton_only_ops_naming_the_fix(op):
    with pytest.raises(RuntimeError, match=rf"no kernel for {op} on CUDA tensors: .*"
                       r"Triton is not installed\. Fix: `pip install triton`"):
        _backend.choose(op, CUDA, None, CUDA_BUILD_NO_TRITON)


@pytest.mark.parametrize("available", [CPU_BUILD_NO_TRITON, NOTHING],
                         ids=["cpu-build-no-triton", "nothing"])
@pytest.mark.parametrize("op", _backend.OPS)
def test_no_gpu_backend_at_all_is_one_clear_error(op, available):
    state = "built without CUDA kernels" if available.native else "is not loaded"
    with pytest.raises(RuntimeError, match=rf"no kernel for {op} on CUDA tensors: .*{state}.* "
                       r"Triton is not installed\. Fix: `pip install triton`"):
        _backend.choose(op, CUDA, None, available)


@pytest.mark.parametrize("available", [NO_NATIVE, NOTHING], ids=["no-native", "nothing"])
@pytest.mark.parametrize("op", _backend.OPS)
def test_no_native_library_on_cpu_names_the_build_command(op, available):
    with pytest.raises(RuntimeError, match=rf"no kernel for {op} on CPU tensors: the native "
                       r"extension grass_kernels\._C is not loaded .*pip install "
                       r"--no-build-isolation -e \."):
        _backend.choose(op, CPU, None, available)
    with pytest.raises(RuntimeError, match=r"backend='cpu' is not available"):
        _backend.choose(op, CPU, "cpu", available)
    assert _backend.choose(op, CPU, "reference", available) == "reference"


@pytest.mark.parametrize("available", [CPU_BUILD, NO_NATIVE], ids=["cpu-build", "no-native"])
@pytest.mark.parametrize("op", CUDA_OPS)
def test_asking_for_absent_cuda_kernels_names_the_fix(op, available):
    with pytest.raises(RuntimeError, match=r"backend='cuda' is not available: .*"
                       r"Fix: rebuild with nvcc on PATH"):
        _backend.choose(op, CUDA, "cuda", available)


@pytest.mark.parametrize("op", _backend.OPS)
def test_asking_for_absent_triton_names_the_fix(op):
    with pytest.raises(RuntimeError, match=r"backend='triton' is not available: Triton is not "
                       r"installed\. Fix: `pip install triton`"):
        _backend.choose(op, CUDA, "triton", CUDA_BUILD_NO_TRITON)


def test_argument_mistakes_are_value_errors_on_every_install():
    for available, op in itertools.product([CUDA_BUILD, NOTHING], _backend.OPS):
        with pytest.raises(ValueError, match="backend must be one of"):
            _backend.choose(op, CPU, "gpu", available)
        with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
            _backend.choose(op, CUDA, "cpu", available)
        with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
            _backend.choose(CUDA_OPS[0], CPU, "cuda", available)


def test_backends_reports_the_resolution_for_each_device():
    report = gk.backends(CPU_BUILD)
    assert report["available"] == {"native": True, "cuda_kernels": False, "triton": True}
    assert report["cpu"] == {op: "cpu" for op in _backend.OPS}
    assert report["cuda"] == {op: "triton" for op in _backend.OPS}
    report = gk.backends(NOTHING)
    assert report["cpu"] == {op: None for op in _backend.OPS}
    assert report["cuda"] == {op: None for op in _backend.OPS}
    report = gk.backends(CUDA_BUILD_NO_TRITON)
    assert report["cuda"] == {op: "cuda" if op in CUDA_OPS else None for op in _backend.OPS}


def test_this_install_is_reported_as_resolve_sees_it():
    """backends() with no argument describes this process, and resolve follows it."""
    report = gk.backends()
    assert report["available"]["native"] == (_backend.NATIVE_ERROR is None)
    for op in _backend.OPS:
        assert report["cuda"][op] == _backend.GPU_DEFAULT[op]
        if report["cpu"][op] is not None:
            assert _backend.resolve(op, CPU, None) == report["cpu"][op]
        if report["cuda"][op] is not None:
            assert _backend.resolve(op, CUDA, None) == report["cuda"][op]
