"""Flat compressors: sjlt, sjlt_transpose, random_indices, mask, grass, gaussian.

Every backend's values on every shape, dtype and memory layout are checked by the sweep
(test_sweep.py). Here: properties of the maps (adjoint, c distinct buckets, unbiased, JL
distortion) on every backend and over many fixed seeds, grass against sjlt of the mask, the
Gaussian paths, more than 2**31 elements, and bad input: each wrong argument raises a named
error.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES, DTYPES, backends_for, rel_err, require_free_memory
from sweep import FP32_RTOL, random_tensor

import grass_kernels as gk
from grass_kernels import _tables, reference

BACKEND_CASES = [(device, backend) for device in DEVICES for backend in backends_for(device)]
ALL_BACKENDS = BACKEND_CASES + [(device, "reference") for device in DEVICES]


def _indices(d: int, seed: int) -> torch.Tensor:
    return gk.random_indices(d, max(1, d // 3 + 1), seed=seed)


# --- properties of the map --------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("c", [1, 3])
def test_adjoint(device, backend, c):
    n, d, k = 4, 777, 48
    x = random_tensor((n, d), torch.float32, device, seed=1)
    y = random_tensor((n, k), torch.float32, device, seed=2)
    lhs = (gk.sjlt(x, k, c=c, seed=9, backend=backend).double() * y.double()).sum()
    rhs = (x.double() * gk.sjlt_transpose(y, d, c=c, seed=9, backend=backend).double()).sum()
    assert abs(float(lhs - rhs)) < 1e-5 * float(x.norm() * y.norm())


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("c", [1, 2, 4])
def test_exactly_c_distinct_buckets(device, backend, c):
    """Column i of the sketch matrix (sjlt of e_i) has c entries +-1/sqrt(c), one per block."""
    d, k = 300, 64
    columns = gk.sjlt(torch.eye(d, device=device), k, c=c, seed=4, backend=backend).cpu()
    nonzero = columns != 0
    assert (nonzero.sum(1) == c).all()
    assert torch.allclose(columns[nonzero].abs(), torch.full((d * c,), 1 / math.sqrt(c)))
    blocks = nonzero.reshape(d, c, k // c).any(-1)  # (d, c): which blocks hold a bucket
    assert blocks.all()
    # Both signs occur, in roughly equal numbers.
    assert abs(float((columns[nonzero] > 0).float().mean()) - 0.5) < 0.1


def _inner_product_estimates(project, d: int, draws: int) -> tuple[torch.Tensor, float]:
    """<P u, P v> for seeds 0..draws-1 and the true <u, v>, for fixed correlated u, v."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(d, generator=g)
    uv = torch.stack([u, 0.6 * u + torch.randn(d, generator=g)])
    est = torch.tensor([float(project(uv, s).prod(0).sum()) for s in range(draws)])
    return est, float(uv[0] @ uv[1])


def _z(est: torch.Tensor, truth: float) -> float:
    return float((est.mean() - truth) / (est.std() / math.sqrt(est.numel())))


@pytest.mark.parametrize("c", [1, 4])
def test_inner_products_unbiased(c):
    """E<Su, Sv> = <u, v> over seeds: a z-test with the empirical standard error."""
    k = 16
    est, truth = _inner_product_estimates(lambda z, s: gk.sjlt(z, k, c=c, seed=s), 200, 3000)
    assert abs(_z(est, truth)) < 4.0
    # Not an exact map: the estimates do vary (standard deviation of order |u| |v| / sqrt(k)).
    assert float(est.std()) > 0.1 * abs(truth) / math.sqrt(k)


def _distance_ratios(project, points: torch.Tensor, seeds: range) -> torch.Tensor:
    """|S(a - b)| / |a - b| over all pairs of points and all seeds."""
    i, j = torch.triu_indices(points.shape[0], points.shape[0], offset=1)
    diffs = points[i] - points[j]
    return torch.cat([project(diffs, s).norm(dim=1) / diffs.norm(dim=1) for s in seeds])


@pytest.mark.parametrize("c", [1, 4])
def test_jl_distortion(c):
    """D = 1000 -> k = 512: the squared-norm ratio has variance ~2/k, so the distance ratio
    has standard deviation ~1/sqrt(2k) = 0.031 and mean |ratio - 1| ~0.025."""
    d, k = 1000, 512
    points = torch.randn(12, d, generator=torch.Generator().manual_seed(1))
    ratios = _distance_ratios(lambda z, s: gk.sjlt(z, k, c=c, seed=s), points, range(40))
    err = (ratios - 1).abs().mean()
    assert err < 0.05
    assert err > 0.25 / math.sqrt(2 * k)  # a real random map, not the identity on its support
    assert abs(float((ratios**2).mean()) - 1) < 0.01  # unbiased squared norms


def test_seed_determinism():
    x = random_tensor((3, 501), torch.float32, "cpu", seed=0)
    for op in (
        lambda s: gk.sjlt(x, 32, c=2, seed=s),
        lambda s: gk.sjlt_transpose(x[:, :32], 501, c=2, seed=s),
        lambda s: gk.grass(x, 32, indices=_indices(501, seed=s), c=2, seed=s),
        lambda s: gk.gaussian(x, 32, seed=s),
    ):
        assert torch.equal(op(1), op(1))
        assert not torch.allclose(op(1), op(2))
    assert torch.equal(gk.random_indices(100, 10, seed=3), gk.random_indices(100, 10, seed=3))
    assert not torch.equal(gk.random_indices(100, 10, seed=3), gk.random_indices(100, 10, seed=4))


# --- mask, grass, random indices, gaussian ----------------------------------------------------


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grass_equals_sjlt_of_mask(device, backend, dtype):
    n, d, k, c = 4, 1203, 40, 2
    x = random_tensor((n, d), dtype, device, seed=3)
    idx = _indices(d, seed=2).to(device)
    fused = gk.grass(x, k, indices=idx, c=c, seed=6, backend=backend)
    unfused = gk.sjlt(gk.mask(x, idx), k, c=c, seed=6, backend=backend)
    assert rel_err(fused, unfused) < FP32_RTOL


def test_mask_values():
    x = random_tensor((3, 50), torch.float32, "cpu", seed=0)
    idx = torch.tensor([0, 7, 49, 20])
    assert torch.equal(gk.mask(x, idx), x[:, idx] * math.sqrt(50 / 4))
    half = x.bfloat16()
    assert torch.equal(gk.mask(half, idx), half[:, idx].float() * math.sqrt(50 / 4))
    assert gk.mask(half, idx).dtype == torch.float32


def test_random_indices_uniform():
    d, k, draws = 50, 10, 2000
    counts = torch.zeros(d)
    for s in range(draws):
        idx = gk.random_indices(d, k, seed=s)
        assert idx.dtype == torch.int64 and idx.shape == (k,)
        assert (idx[1:] > idx[:-1]).all() and idx[0] >= 0 and idx[-1] < d  # sorted, distinct
        counts[idx] += 1
    # Each coordinate is kept with probability k / d: binomial counts, 5 standard deviations.
    p = k / d
    assert ((counts - draws * p).abs() < 5 * math.sqrt(draws * p * (1 - p))).all()


def test_gaussian_matches_materialised_matrix():
    x = random_tensor((5, 301), torch.bfloat16, "cpu", seed=1)
    out = gk.gaussian(x, 24, seed=2)
    assert out.dtype == torch.float32 and out.shape == (5, 24)
    ref = x.float() @ gk.gaussian_matrix(301, 24, seed=2).T
    assert rel_err(out, ref) < FP32_RTOL


def test_gaussian_streamed_path(monkeypatch):
    """A matrix over the cache limit is drawn chunk by chunk on every call: the result equals
    x @ M^T in float64 with M assembled from the same seeded chunks, and the cached path."""
    import grass_kernels.flat as flat

    d, k, seed = 2 * _tables.GAUSSIAN_CHUNK + 1001, 8, 4  # two whole chunks and a tail
    x = random_tensor((3, d), torch.bfloat16, "cpu", seed=5)
    cached = gk.gaussian(x, k, seed=seed)
    monkeypatch.setattr(flat, "_GAUSSIAN_CACHE_BYTES", 1)  # nothing fits: stream
    monkeypatch.setattr(_tables, "gaussian_matrix", None)  # the cached matrix is never asked for
    streamed = gk.gaussian(x, k, seed=seed)
    chunks = [_tables.gaussian_chunk(d, k, lo, min(d, lo + _tables.GAUSSIAN_CHUNK), seed)
              for lo in range(0, d, _tables.GAUSSIAN_CHUNK)]
    assert [c.shape[1] for c in chunks] == [_tables.GAUSSIAN_CHUNK] * 2 + [1001]
    expected = x.double() @ torch.cat(chunks, dim=1).double().T
    assert rel_err(streamed, expected) < FP32_RTOL
    assert rel_err(streamed, cached) < FP32_RTOL


def test_gaussian_unbiased():
    est, truth = _inner_product_estimates(lambda z, s: gk.gaussian(z, 8, seed=s), 100, 1500)
    assert abs(_z(est, truth)) < 4.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tables_identical_across_devices():
    codes = gk.sjlt_codes(1001, 64, c=4, seed=3, device="cuda")
    assert torch.equal(codes.cpu(), gk.sjlt_codes(1001, 64, c=4, seed=3))
    idx = gk.random_indices(1000, 77, seed=5, device="cuda")
    assert torch.equal(idx.cpu(), gk.random_indices(1000, 77, seed=5))
    matrix = gk.gaussian_matrix(300, 16, seed=1, device="cuda")
    assert torch.equal(matrix.cpu(), gk.gaussian_matrix(300, 16, seed=1))
    x = random_tensor((3, 1001), torch.float32, "cpu", seed=0)
    assert rel_err(gk.sjlt(x.cuda(), 64, c=4, seed=3), gk.sjlt(x, 64, c=4, seed=3)) < 1e-5


@pytest.mark.slow
def test_more_than_2_31_elements():
    """N * D > 2**31 (bf16, 4.3 GB): rows past the 32-bit boundary, checked against the
    reference on just those rows. The bulk holds one repeated random block, the checked rows
    fresh values, so a wrapped offset reads different numbers."""
    require_free_memory(6)
    d, k, c = 1031, 16, 2
    n = 2**31 // d + 3
    x = torch.empty(n, d, dtype=torch.bfloat16)
    block = random_tensor((4096, d), torch.bfloat16, "cpu", seed=0)
    for lo in range(0, n, 4096):
        x[lo : lo + 4096] = block[: n - lo]
    rows = torch.tensor([2**31 // d - 1, 2**31 // d, n - 2, n - 1])  # around and past 2**31
    x[rows] = random_tensor((len(rows), d), torch.bfloat16, "cpu", seed=1)
    codes = gk.sjlt_codes(d, k, c=c, seed=0)
    out = gk.sjlt(x, k, c=c, backend="cpu")
    assert rel_err(out[rows], reference.sjlt(x[rows], codes, k)) < FP32_RTOL
    idx = torch.tensor([0, 5, 400, d - 1])
    out = gk.grass(x, k, indices=idx, c=c, backend="cpu")
    ref = reference.grass(x[rows], idx, gk.sjlt_codes(4, k, c=c, seed=0), k, math.sqrt(d / 4))
    assert rel_err(out[rows], ref) < FP32_RTOL


@pytest.mark.slow
def test_transpose_more_than_2_31_elements():
    """sjlt_transpose reading y (N, k) with N * k > 2**31 (bf16, 4.3 GB), rows past the 32-bit
    boundary checked against the reference on those rows (bulk: one repeated random block)."""
    require_free_memory(6)
    d, k, c = 9, 1024, 2  # few (coordinate, copy) pairs: the kernel reads 18 entries a row
    n = 2**31 // k + 3
    y = torch.empty(n, k, dtype=torch.bfloat16)
    block = random_tensor((4096, k), torch.bfloat16, "cpu", seed=0)
    whole = n - n % 4096
    y[:whole].view(-1, 4096, k).copy_(block.expand(whole // 4096, 4096, k))
    y[whole:] = block[: n - whole]
    rows = torch.tensor([2**31 // k - 1, 2**31 // k, n - 2, n - 1])
    y[rows] = random_tensor((len(rows), k), torch.bfloat16, "cpu", seed=1)
    out = gk.sjlt_transpose(y, d, c=c, backend="cpu")
    ref = reference.sjlt_transpose(y[rows], gk.sjlt_codes(d, k, c=c, seed=0))
    del y
    assert rel_err(out[rows], ref) < FP32_RTOL


# --- bad input --------------------------------------------------------------------------------

X = torch.randn(3, 40)


SIZE_ERRORS = [(4, 8, "c .*at most k"), (10, 4, "divisible by c"), (0, 1, "k must be a positive"),
               (-3, 1, "k must be a positive")]


@pytest.mark.parametrize("k,c,match", SIZE_ERRORS)
def test_bad_sizes(k, c, match):
    with pytest.raises(ValueError, match=match):
        gk.sjlt(X, k, c=c)
    with pytest.raises(ValueError, match=match):
        gk.grass(X, k, c=c, indices=torch.arange(5))


@pytest.mark.parametrize("k,c,match", SIZE_ERRORS[:2])
def test_bad_sizes_transpose(k, c, match):
    """sjlt_transpose takes k from y's width."""
    with pytest.raises(ValueError, match=match):
        gk.sjlt_transpose(torch.randn(3, k), 40, c=c)


def test_bad_k_type():
    with pytest.raises(TypeError, match="k must be a positive int"):
        gk.sjlt(X, 4.0)
    with pytest.raises(ValueError, match="d must be a positive int"):
        gk.sjlt_transpose(torch.randn(3, 8), 0)
    with pytest.raises(ValueError, match="k must be a positive int"):
        gk.gaussian(X, 0)


@pytest.mark.parametrize("op", ["mask", "grass"])
@pytest.mark.parametrize(
    "indices,error,match",
    [
        (torch.arange(41), ValueError, "41 entries but the dimension it indexes is only 40"),
        (torch.tensor([0, 40]), ValueError, r"must lie in \[0, 40\)"),
        (torch.tensor([-1, 3]), ValueError, r"must lie in \[0, 40\)"),
        (torch.tensor([3, 5, 3]), ValueError, "duplicate"),
        (torch.tensor([[1, 2]]), ValueError, "must be 1-D"),
        (torch.tensor([1.0, 2.0]), TypeError, "int64 or int32"),
        (torch.tensor([], dtype=torch.int64), ValueError, "must not be empty"),
    ],
)
def test_bad_indices(op, indices, error, match):
    with pytest.raises(error, match=match):
        if op == "mask":
            gk.mask(X, indices)
        else:
            gk.grass(X, 8, indices=indices)


@pytest.mark.parametrize("shape", [(40,), (2, 3, 40)])
def test_wrong_ndim(shape):
    x = torch.randn(*shape)
    for call in (lambda: gk.sjlt(x, 8), lambda: gk.grass(x, 8, indices=torch.arange(4)),
                 lambda: gk.mask(x, torch.arange(4)), lambda: gk.gaussian(x, 8),
                 lambda: gk.sjlt_transpose(x, 40)):
        with pytest.raises(ValueError, match=r"must have shape \(N, D\)"):
            call()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.complex64,
                                   torch.float64])
def test_bad_dtype(dtype):
    x = torch.ones(3, 40, dtype=dtype)
    for call in (lambda: gk.sjlt(x, 8), lambda: gk.grass(x, 8, indices=torch.arange(4)),
                 lambda: gk.mask(x, torch.arange(4)), lambda: gk.gaussian(x, 8),
                 lambda: gk.sjlt_transpose(x, 40)):
        with pytest.raises(TypeError, match="must be float32, bfloat16 or float16"):
            call()


def test_device_mismatch():
    other = "cuda" if torch.cuda.is_available() else "meta"
    idx = torch.arange(4, device=other)
    with pytest.raises(ValueError, match=f"indices is on {other}.* but x is on cpu"):
        gk.grass(X, 8, indices=idx)
    with pytest.raises(ValueError, match=f"indices is on {other}.* but x is on cpu"):
        gk.mask(X, idx)


def test_backend_device_mismatch():
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        gk.sjlt(X, 8, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        gk.sjlt(X, 8, backend="numpy")


def test_native_ops_reject_bad_tables():
    """Called directly (no Python checks), the CPU ops still refuse tables that would read or
    write out of bounds."""
    ops = torch.ops.grass_kernels
    codes = gk.sjlt_codes(40, 8, c=2, seed=0).clone()
    codes[7, 1] = 8  # bucket 8 with k = 8
    with pytest.raises(ValueError, match=r"buckets in \[0, k = 8\)"):
        ops.sjlt(X, codes, 8)
    codes[7, 1] = ~9  # negative sign, bucket 9
    with pytest.raises(ValueError, match=r"buckets in \[0, k = 8\)"):
        ops.sjlt_transpose(torch.randn(3, 8), codes)
    good = gk.sjlt_codes(3, 8, c=2, seed=0)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 40\)"):
        ops.grass(X, torch.tensor([1, 2, 40]), good, 8, 1.0)
    with pytest.raises(ValueError, match="codes must have shape"):
        ops.sjlt(X, good, 8)
    with pytest.raises(TypeError, match="codes must be int32"):
        ops.sjlt(X, gk.sjlt_codes(40, 8, c=2, seed=0).long(), 8)
    with pytest.raises(ValueError, match=r"c = 2 copies per coordinate but k = 1"):
        ops.sjlt(X, gk.sjlt_codes(40, 8, c=2, seed=0), 1)
    with pytest.raises(ValueError, match="k must be positive"):
        ops.grass(X, torch.tensor([1, 2, 3]), good, 0, 1.0)
