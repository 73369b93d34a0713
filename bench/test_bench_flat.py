"""pytest-benchmark suite for the flat ops on the CPU (the table is ``python -m bench``).

Run on purpose, with the malloc thresholds of ``bench.timing.MALLOC_ENV`` in the environment:
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
        python -m pytest bench/test_bench_flat.py --benchmark-enable
Groups put each kernel next to its baselines: group "sjlt-D-k-c" holds the CPU kernel, the
torch reference (index_add_) and one read of x; group "grass-D-k-c" the fused kernel and
mask-then-sjlt.
"""

from __future__ import annotations

import functools

import pytest
import torch

import grass_kernels as gk
from grass_kernels import reference

N = 32
SIZES = [(10**5, 4096, 1), (10**6, 4096, 1), (10**6, 4096, 4), (10**6, 8192, 1)]
IDS = [f"D{d:.0e}-k{k}-c{c}" for d, k, c in SIZES]


@functools.lru_cache(maxsize=2)
def _x(d: int) -> torch.Tensor:
    return torch.randn(N, d, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("side", ["kernel", "index_add", "read"])
@pytest.mark.parametrize("d,k,c", SIZES, ids=IDS)
def test_sjlt(benchmark, d, k, c, side):
    x, codes = _x(d), gk.sjlt_codes(d, k, c=c, seed=0)
    fn = {
        "kernel": lambda: gk.sjlt(x, k, c=c),
        "index_add": lambda: reference.sjlt(x, codes, k),
        "read": lambda: x.sum(),
    }[side]
    benchmark.group = f"sjlt D{d:.0e} k{k} c{c}"
    benchmark(fn)


@pytest.mark.parametrize("side", ["fused", "unfused"])
@pytest.mark.parametrize("d,k,c", SIZES, ids=IDS)
def test_grass(benchmark, d, k, c, side):
    x, idx = _x(d), gk.random_indices(d, 4 * k, seed=1)
    fn = {
        "fused": lambda: gk.grass(x, k, indices=idx, c=c),
        "unfused": lambda: gk.sjlt(gk.mask(x, idx), k, c=c),
    }[side]
    benchmark.group = f"grass D{d:.0e} k{k} c{c}"
    benchmark(fn)


@pytest.mark.parametrize("d,k,c", SIZES, ids=IDS)
def test_sjlt_transpose(benchmark, d, k, c):
    y = torch.randn(N, k)
    benchmark.group = f"sjlt_transpose D{d:.0e} k{k} c{c}"
    benchmark(lambda: gk.sjlt_transpose(y, d, c=c))
