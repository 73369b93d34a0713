"""The CUDA part of the native extension: registered kernels, their register use in the built
library (no spills), and (on a GPU) that its kernels run on the current stream. Their values,
on every launch path the sweep's shapes reach, are checked by the sweep (test_sweep.py).

Which ops have CUDA kernels is fixed here (CUDA_OPS); grass_kernels._backend.GPU_DEFAULT must
not route an op to "cuda" unless it is in that set, and _backend.NO_CUDA_KERNEL names the rest.
The registration and register-use tests skip, and say why, under the conditions in which
setup.py leaves the CUDA sources out (a CPU-only torch, no nvcc, GRASS_KERNELS_CPU_ONLY=1); the
stream test needs a CUDA device.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess

import pytest
import torch
from torch.utils.cpp_extension import CUDA_HOME

from conftest import rel_err
from sweep import FP32_RTOL, random_tensor

import grass_kernels as gk
from grass_kernels import _backend, reference
from grass_kernels._library import NATIVE_ERROR

CUDA_OPS = ("sjlt", "sjlt_transpose", "grass", "fact_grass")
ALL_OPS = ("sjlt", "sjlt_transpose", "grass", "logra", "fact_grass", "fact_sjlt")


def _registration_skip_reason() -> str | None:
    if torch.version.cuda is None:
        return "torch is a CPU-only build: the extension has no CUDA kernels to check"
    if os.environ.get("GRASS_KERNELS_CPU_ONLY") == "1":
        return "GRASS_KERNELS_CPU_ONLY=1: the extension was built without its CUDA sources"
    if not (shutil.which("nvcc") or os.path.exists(os.path.join(CUDA_HOME or "", "bin", "nvcc"))):
        return "nvcc is not found: setup.py builds the extension without its CUDA sources"
    if NATIVE_ERROR is not None:
        return f"the native extension is not built: {NATIVE_ERROR}"
    return None


def _has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"grass_kernels::{op}", "CUDA")


@pytest.mark.parametrize("op", ALL_OPS)
def test_cuda_kernel_registration(op):
    reason = _registration_skip_reason()
    if reason:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    assert _has_cuda_kernel(op) == (op in CUDA_OPS), (
        f"grass_kernels::{op}: CUDA kernel registered = {_has_cuda_kernel(op)}, expected "
        f"{op in CUDA_OPS}. A CPU-only build? Rebuild with CUDA (`make build`), or run the "
        "tests with GRASS_KERNELS_CPU_ONLY=1 as the build was."
    )


def test_gpu_defaults_only_name_registered_cuda_kernels():
    routed = {op for op, backend in _backend.GPU_DEFAULT.items() if backend == "cuda"}
    missing = routed - set(CUDA_OPS)
    assert not missing, f"GPU_DEFAULT routes {missing} to CUDA, which has no kernel for them"
    assert set(_backend.NO_CUDA_KERNEL) == set(ALL_OPS) - set(CUDA_OPS)


# Kernel entry points (substrings of the mangled names) that the built library must hold.
CUDA_KERNELS = ("sjlt_rows_kernel", "sjlt_transpose_kernel", "fact_grass_kernel")


def _cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit or PATH, else the copy bundled with Triton."""
    candidates = [os.path.join(CUDA_HOME or "", "bin", "cuobjdump"), shutil.which("cuobjdump")]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                       "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.exists(c)), None)


def test_cuda_kernels_do_not_spill():
    """Every CUDA kernel in the built library keeps its state in registers: no stack frame and
    no local memory (ptxas places spills there) for any instantiation."""
    reason = _registration_skip_reason()
    tool = _cuobjdump()
    if reason is None and tool is None:
        reason = "cuobjdump is not found (CUDA_HOME/bin, PATH, or Triton's bundled copy)"
    if reason:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    library = os.environ.get("GRASS_KERNELS_LIBRARY") or importlib.import_module(
        "grass_kernels._C").__file__
    listing = subprocess.run([tool, "-res-usage", library], capture_output=True, text=True,
                             check=True).stdout
    usage = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)",
                       listing)
    names = [name for name, *_ in usage]
    for kernel in CUDA_KERNELS:
        assert any(kernel in name for name in names), f"{kernel} is not in {library}"
    spilling = [(name, int(stack), int(local)) for name, _, stack, local in usage
                if int(stack) or int(local)]
    assert not spilling, f"kernels with a stack frame or local memory (spills): {spilling}"


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_gpu
def test_cuda_kernels_run_on_the_current_stream():
    x = random_tensor((4, 5000), device="cuda")
    codes = gk.sjlt_codes(5000, 256, c=2, seed=0, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # x was made on the default stream
    with torch.cuda.stream(side):
        # x_side is written late on the side stream (after ~25 ms of sleep): a kernel launched
        # on another stream would read it before it is written.
        torch.cuda._sleep(50_000_000)
        x_side = x * 1.0
        out = torch.ops.grass_kernels.sjlt(x_side, codes, 256)
    torch.cuda.synchronize()
    assert rel_err(out, reference.sjlt(x, codes, 256)) < FP32_RTOL
