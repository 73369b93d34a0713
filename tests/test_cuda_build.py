"""The CUDA part of the native extension: registered kernels, their register use in the built
library (no spills), and (on a GPU) each launch path of the CUDA kernels against the reference.

Which ops have CUDA kernels is fixed here (CUDA_OPS); grass_kernels._backend.GPU_DEFAULT must
not route an op to "cuda" unless it is in that set, and _backend.NO_CUDA_KERNEL names the rest.
The registration and register-use tests skip, and say why, under the conditions in which
setup.py leaves the CUDA sources out (a CPU-only torch, no nvcc, GRASS_KERNELS_CPU_ONLY=1); the
kernel tests need a CUDA device.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import shutil
import subprocess

import pytest
import torch
from torch.utils.cpp_extension import CUDA_HOME

import grass_kernels as gk
from grass_kernels import _backend, reference
from grass_kernels._library import NATIVE_ERROR

from conftest import DTYPES, RTOL, rel_err

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


def _randn(*shape, dtype=torch.float32, gen=None) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype).cuda()


# (N, D, k, c): rows-per-block groups with a ragged last group, 16-byte-aligned rows (vector
# loads) and unaligned ones, many chunks per row, k too large for shared memory (the
# global-atomics path), c > 1 and c = k.
FLAT_CASES = [(1, 1, 1, 1), (5, 1003, 64, 4), (9, 70001, 512, 2), (7, 64000, 1024, 2),
              (3, 4099, 96, 96), (2, 333, 65536, 2)]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,k,c", FLAT_CASES)
def test_flat_cuda_matches_reference(n, d, k, c, dtype):
    g = torch.Generator().manual_seed(n * 7 + d)
    x = _randn(n, d, dtype=dtype, gen=g)
    codes = gk.sjlt_codes(d, k, c=c, seed=3, device="cuda")
    ref = reference.sjlt(x, codes, k)
    assert rel_err(torch.ops.grass_kernels.sjlt(x, codes, k), ref) < RTOL[dtype]
    # Views with unit column stride: unaligned rows (scalar loads); aligned rows whose length
    # is not a multiple of the vector width (vector loads, ragged tail); and a column-strided
    # view (read in place through its column stride).
    wide = _randn(n, d + 3, dtype=dtype, gen=g)
    padded = _randn(n, d + 16 - d % 8, dtype=dtype, gen=g)[:, : max(1, d - 3)]
    for view in (wide[:, 1:-2], padded, wide.T.contiguous().T[:, :d]):
        view_codes = gk.sjlt_codes(view.shape[1], k, c=c, seed=3, device="cuda")
        out = torch.ops.grass_kernels.sjlt(view, view_codes, k)
        assert rel_err(out, reference.sjlt(view, view_codes, k)) < RTOL[dtype]

    y = _randn(n, k, dtype=dtype, gen=g)
    out_t = torch.ops.grass_kernels.sjlt_transpose(y, codes)
    assert rel_err(out_t, reference.sjlt_transpose(y, codes)) < RTOL[dtype]

    kp = max(1, d // 3)
    idx = gk.random_indices(d, kp, seed=5).cuda()
    gcodes = gk.sjlt_codes(kp, k, c=c, seed=4, device="cuda")
    scale = math.sqrt(d / kp)
    out_g = torch.ops.grass_kernels.grass(x, idx, gcodes, k, scale)
    assert rel_err(out_g, reference.grass(x, idx, gcodes, k, scale)) < RTOL[dtype]


# (B, T, d_in, d_out, k_i', k_o', k, c, bias): T = 1, many token splits with a ragged last step,
# several 128-tiles per side with ragged edges, d_out = 1, k_i' = d_in + bias (bias column
# selected), k too large for shared memory.
FACT_CASES = [
    (3, 1, 17, 9, 5, 4, 32, 1, False),
    (2, 1000, 40, 33, 41, 16, 256, 4, True),
    (2, 77, 300, 1, 257, 1, 128, 2, True),
    (1, 45, 200, 260, 150, 140, 64, 64, False),
    (2, 5, 30, 20, 10, 10, 65536, 1, False),
]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FACT_CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_fact_grass_cuda_matches_reference(case, dtype, masked):
    b, t, d_in, d_out, ki, ko, k, c, bias = case
    g = torch.Generator().manual_seed(b * 1000 + t)
    acts = _randn(b, t, d_in, dtype=dtype, gen=g)
    grads = _randn(b, t, d_out, dtype=dtype, gen=g)
    mask = (torch.rand(b, t, generator=g) > 0.3).float().cuda() if masked else None
    in_idx = gk.random_indices(d_in + bias, ki, seed=1).cuda()
    out_idx = gk.random_indices(d_out, ko, seed=2).cuda()
    codes = gk.sjlt_codes(ki * ko, k, c=c, seed=6, device="cuda")
    scale = math.sqrt(d_out * (d_in + bias) / (ki * ko))
    args = (acts, grads, in_idx, out_idx, codes, k, scale, mask, bias)
    out = torch.ops.grass_kernels.fact_grass(*args)
    assert rel_err(out, reference.fact_grass(*args)) < RTOL[dtype]


@needs_gpu
def test_cuda_kernels_run_on_the_current_stream():
    x = _randn(4, 5000)
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
    assert rel_err(out, reference.sjlt(x, codes, 256)) < RTOL[torch.float32]
