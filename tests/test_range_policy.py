"""One policy on every backend for bad arguments: the native kernels (CPU, and CUDA where a GPU
is present) and the Triton kernels, called straight through their op namespaces, raise the
same ValueError with the same message for a table or index set out of range, before any kernel
reads it; and the same class for every other mistake: TypeError for a dtype, ValueError for a
shape.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES

import grass_kernels as gk
from grass_kernels import _backend

NATIVE = {"cpu": "cpu", "cuda": "cuda"}


def _codes(rows: int, k: int, c: int, seed: int) -> torch.Tensor:
    return gk.sjlt_codes(rows, k, c=c, seed=seed)


def _bad_inputs():
    """case -> (op, args on the CPU, expected message). Each case corrupts one table entry."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, generator=g)
    y = torch.randn(3, 8, generator=g)
    acts, grads = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 4, generator=g)
    codes = _codes(10, 8, 2, 0)
    high = codes.clone()
    high[4, 1] = 8  # bucket k
    negated = codes.clone()
    negated[7, 0] = ~9  # bucket 9 with sign -1
    idx = torch.tensor([1, 3, 10])  # 10 is past D = 10
    grass_codes = _codes(3, 8, 2, 1)
    in_idx, out_idx = torch.tensor([0, 5]), torch.tensor([1, -1])
    fg_codes = _codes(4, 8, 2, 2)
    codes_in, codes_out = _codes(5, 4, 1, 3), _codes(4, 4, 1, 4)
    bad_out = codes_out.clone()
    bad_out[2, 0] = ~4
    return {
        "sjlt-high": ("sjlt", (x, high, 8),
                      "codes must hold buckets in [0, k = 8); found bucket 8"),
        "sjlt-negated": ("sjlt", (x, negated, 8),
                         "codes must hold buckets in [0, k = 8); found bucket 9"),
        "sjlt_transpose": ("sjlt_transpose", (y, high),
                           "codes must hold buckets in [0, k = 8); found bucket 8"),
        "grass-indices": ("grass", (x, idx, grass_codes, 8, 1.0),
                          "indices must lie in [0, 10), got values in [1, 10]"),
        # in_indices may name the bias column d_in = 5 when bias; out_indices has -1.
        "fact_grass-out": ("fact_grass", (acts, grads, in_idx, out_idx, fg_codes, 8, 1.0, None,
                                          True),
                           "out_indices must lie in [0, 4), got values in [-1, 1]"),
        "fact_grass-in": ("fact_grass", (acts, grads, in_idx, torch.tensor([1, 2]), fg_codes, 8,
                                         1.0, None, False),
                          "in_indices must lie in [0, 5), got values in [0, 5]"),
        "fact_sjlt": ("fact_sjlt", (acts, grads, codes_in, bad_out, 4, 4, None, False),
                      "codes_out must hold buckets in [0, k_out = 4); found bucket 4"),
        "sjlt-k-below-c": ("sjlt", (x, codes, 1),
                           "codes has c = 2 copies per coordinate but k = 1 (need c <= k)"),
    }



CASES = [
    pytest.param(case, device, backend, id=f"{case}-{device}-{backend}")
    for case, (op, _, _) in _bad_inputs().items()
    for device in DEVICES
    for backend in ([] if device == "cuda" and op in _backend.NO_CUDA_KERNEL else [NATIVE[device]])
    + ["triton"]
]


@pytest.mark.parametrize("case,device,backend", CASES)
def test_out_of_range_is_the_same_value_error_on_every_backend(case, device, backend):
    op, args, message = _bad_inputs()[case]
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    with pytest.raises(ValueError) as raised:
        _backend.implementation(op, backend)(*args)
    assert str(raised.value).splitlines()[0] == message


def _mistakes():
    """case -> (op, args on the CPU, the exception class every backend raises)."""
    x = torch.randn(3, 10)
    codes = _codes(10, 8, 2, 0)
    acts, grads = torch.randn(2, 3, 5), torch.randn(2, 3, 4)
    return {
        "x-int": ("sjlt", (x.long(), codes, 8), TypeError),
        "codes-int64": ("sjlt", (x, codes.long(), 8), TypeError),
        "x-1d": ("sjlt", (x[0], codes, 8), ValueError),
        "codes-rows": ("sjlt", (x, codes[:9], 8), ValueError),
        "indices-int32": ("grass", (x, torch.tensor([1, 2], dtype=torch.int32), codes[:2], 8,
                                    1.0), TypeError),
        "indices-2d": ("grass", (x, torch.tensor([[1, 2]]), codes[:2], 8, 1.0), ValueError),
        "mask-bool": ("fact_sjlt", (acts, grads, _codes(5, 4, 1, 3), _codes(4, 4, 1, 4), 4, 4,
                                    torch.ones(2, 3, dtype=torch.bool), False), TypeError),
        "mask-shape": ("fact_sjlt", (acts, grads, _codes(5, 4, 1, 3), _codes(4, 4, 1, 4), 4, 4,
                                     torch.ones(2, 4), False), ValueError),
        "tokens-disagree": ("fact_sjlt", (acts, grads[:, :2], _codes(5, 4, 1, 3),
                                          _codes(4, 4, 1, 4), 4, 4, None, False), ValueError),
    }


@pytest.mark.parametrize("case", list(_mistakes()))
def test_each_kind_of_mistake_is_one_exception_class_on_every_backend(case):
    op, args, error = _mistakes()[case]
    for backend in ("cpu", "triton"):
        with pytest.raises(error):
            _backend.implementation(op, backend)(*args)
