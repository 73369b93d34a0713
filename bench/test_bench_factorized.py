"""pytest-benchmark suite for the factorized ops on the CPU (B x T = 4 x 256).

Run on purpose (the test run disables benchmarks):
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \
        .venv/bin/python -m pytest bench/test_bench_factorized.py --benchmark-enable
Each (layer, side) is one benchmark; compare sides of one layer with ``--benchmark-group-by=param:layer``.
For the side-by-side ratio table use ``python -m bench --only factorized``.
"""

from __future__ import annotations

import math

import pytest
import torch

import grass_kernels as gk
from grass_kernels import _tables

from . import factorized as bf

LAYERS = {f"{d_in}x{d_out}": (d_in, d_out) for _, d_in, d_out in bf.SHAPES}


@pytest.fixture(scope="module", params=list(LAYERS))
def layer(request):
    d_in, d_out = LAYERS[request.param]
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(bf.B, bf.T, d_in, generator=g)
    grads = torch.randn(bf.B, bf.T, d_out, generator=g)
    buckets, signs = _tables.decode_codes(gk.sjlt_codes(bf.GRASS_K**2, bf.K, c=1, seed=0))
    return {
        "acts": acts,
        "grads": grads,
        "idx_in": gk.random_indices(d_in, bf.GRASS_K, seed=1),
        "idx_out": gk.random_indices(d_out, bf.GRASS_K, seed=2),
        "p_in": gk.gaussian_matrix(d_in, bf.LOGRA_K, seed=3),
        "p_out": gk.gaussian_matrix(d_out, bf.LOGRA_K, seed=4),
        "buckets": buckets.view(-1),
        "weights": signs.view(-1) * math.sqrt(d_in * d_out) / bf.GRASS_K,
    }


SIDES = {
    "fact_grass": lambda L: gk.fact_grass(
        L["acts"], L["grads"], k=bf.K, in_indices=L["idx_in"], out_indices=L["idx_out"]
    ),
    "unfused_fact_grass": lambda L: bf._unfused_fact_grass(
        L["acts"], L["grads"], L["idx_in"], L["idx_out"], L["buckets"], L["weights"]
    ),
    "fact_sjlt": lambda L: gk.fact_sjlt(
        L["acts"], L["grads"], k_in=bf.SJLT_K, k_out=bf.SJLT_K, path="factorized"
    ),
    "logra": lambda L: gk.logra(
        L["acts"], L["grads"], p_in=L["p_in"], p_out=L["p_out"], path="factorized"
    ),
    "logra_torch": lambda L: bf._logra_torch(L["acts"], L["grads"], L["p_in"], L["p_out"]),
    "read": lambda L: L["acts"].sum() + L["grads"].sum(),
}


@pytest.mark.parametrize("side", list(SIDES))
def test_factorized(benchmark, layer, side):
    benchmark.group = f"{tuple(layer['acts'].shape)} -> {layer['grads'].shape[-1]}"
    out = benchmark(SIDES[side], layer)
    assert torch.isfinite(out).all()
