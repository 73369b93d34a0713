"""The argument checks and dispatch refusals that the CPU and CUDA backends share.

The native ops, called directly through torch.ops (no Python checks), must refuse an index or
SJLT bucket out of range with the same ValueError on every device before any kernel reads
through it; the public ops must refuse backend="cuda" for the ops without a CUDA kernel, naming
the backends that have one. Every case runs on the CPU; the CUDA cases run where a GPU is.
"""

from __future__ import annotations

import pytest
import torch

import grass_kernels as gk
from grass_kernels import _backend

OPS = torch.ops.grass_kernels


def _device(name: str) -> str:
    if name == "cuda" and not torch.cuda.is_available():
        reason = "needs a CUDA device (the same checks run on the CPU here)"
        print(f"skipping: {reason}")
        pytest.skip(reason)
    return name


def _codes(d: int, k: int, c: int, device: str) -> torch.Tensor:
    return gk.sjlt_codes(d, k, c=c, seed=0).clone().to(device)


def _linear(device: str):
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(2, 5, 8, generator=g).to(device)
    grads = torch.randn(2, 5, 6, generator=g).to(device)
    return acts, grads


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("bad_code", [8, 1000, ~8, ~1000])
def test_flat_ops_refuse_buckets_out_of_range(device, bad_code):
    dev = _device(device)
    x = torch.randn(3, 40).to(dev)
    codes = _codes(40, 8, 2, dev)
    codes[7, 1] = bad_code  # bucket 8 or more (a negative code is bucket ~code) with k = 8
    bucket = bad_code if bad_code >= 0 else ~bad_code
    message = rf"codes must hold buckets in \[0, k = 8\); found bucket {bucket}"
    with pytest.raises(ValueError, match=message):
        OPS.sjlt(x, codes, 8)
    with pytest.raises(ValueError, match=message):
        OPS.sjlt_transpose(torch.randn(3, 8).to(dev), codes)
    with pytest.raises(ValueError, match=message):
        OPS.grass(x, torch.arange(40, device=dev), codes, 8, 1.0)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("bad_index", [40, -1, 2**40])
def test_grass_refuses_indices_out_of_range(device, bad_index):
    dev = _device(device)
    x = torch.randn(3, 40).to(dev)
    idx = torch.tensor([1, 2, bad_index], device=dev)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 40\), got values in"):
        OPS.grass(x, idx, _codes(3, 8, 2, dev), 8, 1.0)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fact_grass_refuses_tables_out_of_range(device):
    dev = _device(device)
    acts, grads = _linear(dev)
    good_in = torch.tensor([0, 3, 8], device=dev)  # 8 = the bias column (d_in = 8)
    good_out = torch.tensor([1, 5], device=dev)
    codes = _codes(6, 16, 1, dev)

    def call(idx_in, idx_out, table, k=16, bias=True):
        return OPS.fact_grass(acts, grads, idx_in, idx_out, table, k, 1.0, None, bias)

    assert call(good_in, good_out, codes).shape == (2, 16)  # the good tables pass
    with pytest.raises(ValueError, match=r"in_indices must lie in \[0, 8\), got values in"):
        call(good_in, good_out, codes, bias=False)  # column 8 exists only with the bias
    with pytest.raises(ValueError, match=r"in_indices must lie in \[0, 9\)"):
        call(torch.tensor([0, -3, 8], device=dev), good_out, codes)
    with pytest.raises(ValueError, match=r"out_indices must lie in \[0, 6\)"):
        call(good_in, torch.tensor([1, 6], device=dev), codes)
    small = _codes(6, 8, 1, dev)
    small[4, 0] = ~12
    with pytest.raises(ValueError, match=r"buckets in \[0, k = 8\); found bucket 12"):
        call(good_in, good_out, small, k=8)


def test_fact_sjlt_cpu_refuses_buckets_out_of_range():
    acts, grads = _linear("cpu")
    codes_in, codes_out = _codes(8, 4, 1, "cpu"), _codes(6, 4, 1, "cpu")
    codes_out[2, 0] = ~4
    with pytest.raises(ValueError, match=r"codes_out must hold buckets in \[0, k_out = 4\)"):
        OPS.fact_sjlt(acts, grads, codes_in, codes_out, 4, 4, None, False)


@pytest.mark.parametrize("op", sorted(_backend.NO_CUDA_KERNEL))
def test_backend_cuda_refused_where_no_cuda_kernel(op):
    """Refused before dispatch, on any device, whichever path (fused or materialised) runs."""
    acts, grads = _linear("cpu")
    for path in ("factorized", "materialize"):
        if op == "logra":
            p_in = gk.gaussian_matrix(8, 4, seed=0)
            p_out = gk.gaussian_matrix(6, 3, seed=1)
            call = lambda: gk.logra(acts, grads, p_in=p_in, p_out=p_out, backend="cuda", path=path)
        else:
            call = lambda: gk.fact_sjlt(acts, grads, k_in=4, k_out=4, backend="cuda", path=path)
        with pytest.raises(ValueError, match=rf"{op} has no CUDA kernel .*backend='triton'"):
            call()
    with pytest.raises(ValueError, match=rf"{op} has no CUDA kernel"):
        _backend.resolve(op, torch.device("cuda"), "cuda")


def test_gpu_defaults_and_native_registrations_agree_with_the_refusals():
    for op in _backend.NO_CUDA_KERNEL:
        assert _backend.GPU_DEFAULT[op] != "cuda", op
        assert _backend.resolve(op, torch.device("cuda"), None) == _backend.GPU_DEFAULT[op]
    for op in set(_backend.GPU_DEFAULT) - set(_backend.NO_CUDA_KERNEL):
        if _backend.AVAILABLE.cuda_kernels:
            assert _backend.resolve(op, torch.device("cuda"), "cuda") == "cuda"
        else:
            with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
                _backend.resolve(op, torch.device("cuda"), "cuda")
