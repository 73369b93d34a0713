"""Statistics of the random maps, with two-sided bounds, checked apart from the kernels' oracle.

The equality tests compare every kernel with ``grass_kernels.reference``, which reads the same
SJLT table (``grass_kernels._tables``): a wrong table passes them. Here the table is checked
on its own, against the definition of the SJLT(k, c) with blocks of width w = k / c:

    structure   row i of the (d, c) table holds c distinct buckets, bucket j in block j
                ([j w, (j + 1) w)), codes decoded here from the documented bit layout
    occupancy   the d entries of each block fall uniformly over its w buckets: a chi-square
                test on the k bucket counts, two-sided (too even is as wrong as too uneven)
    signs       +1 and -1 equally likely: a binomial z-test
    variance    the closed forms of the estimators' variance, derived below, against the
                variance over many seeds (the mean against the truth as well)

Variance of the SJLT inner-product estimator <Su, Sv> (u, v in R^D, one seed = one table).
Within block j, with h the bucket and s the sign of each coordinate in that block,

    Z_j = sum_b (sum_{i: h(i)=b} s_i u_i)(sum_{i': h(i')=b} s_i' v_i')
        = <u, v> + sum_{i < i'} [h(i) = h(i')] s_i s_i' (u_i v_i' + u_i' v_i),

and <Su, Sv> = (1/c) sum_j Z_j. The collision indicators have mean 1/w and the sign products
are independent with mean 0, so the cross terms are uncorrelated and

    Var Z_j = (1/w) sum_{i < i'} (u_i v_i' + u_i' v_i)^2
            = (1/w) (|u|^2 |v|^2 + <u, v>^2 - 2 sum_i u_i^2 v_i^2).

Blocks are independent: Var <Su, Sv> = (c / c^2) Var Z_j, and c w = k, so

    Var <Su, Sv> = (|u|^2 |v|^2 + <u, v>^2 - 2 sum_i u_i^2 v_i^2) / k,

whatever c. With u = v this is the JL distortion:

    Var(|Su|^2 / |u|^2) = 2 (1 - sum u_i^4 / |u|^4) / k.

A table that uses half of each block's buckets doubles it (w -> w / 2); one that repeats a
bucket within a coordinate adds a random self term and raises it too.

Random mask, y = sqrt(D / k') u[S] with S a uniform k'-subset: <Mu, Mv> = (D / k') sum_{i in S} a_i
with a_i = u_i v_i, a sample without replacement, so

    Var <Mu, Mv> = (D / k')^2 k' (D - k') / (D - 1) * sigma_a^2,
    sigma_a^2 = mean_i (a_i - mean a)^2.
"""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

import grass_kernels as gk
from grass_kernels import _tables

# Two-sided thresholds: a z beyond Z_MAX or a p-value outside (P_MIN, 1 - P_MIN) fails. At
# these levels a correct map fails with probability ~1e-6 per check; the draws are seeded, so
# a pass or a failure is reproducible.
Z_MAX = 5.0
P_MIN = 1e-6
# The table drawer itself, kept before any test patches a mutant over it.
DRAW_CODES = _tables._sjlt_codes_cpu.__wrapped__


# --- the checks -----------------------------------------------------------------------------


def decode(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets (int64) and signs (+-1 float64) from the int32 layout: b >= 0 is bucket b with
    sign +1, a negative code is ~b = -b - 1, bucket b with sign -1."""
    codes = codes.to(torch.int64)
    negative = codes < 0
    return torch.where(negative, -codes - 1, codes), 1.0 - 2.0 * negative.double()


def structure_failures(codes: torch.Tensor, d: int, k: int, c: int) -> list[str]:
    """What is wrong with the layout of an SJLT table for (d, k, c); empty when nothing is."""
    if codes.dtype != torch.int32 or tuple(codes.shape) != (d, c):
        return [f"table is {codes.dtype} {tuple(codes.shape)}, not int32 ({d}, {c})"]
    buckets, _ = decode(codes)
    width = k // c
    failures = []
    if ((buckets < 0) | (buckets >= k)).any():
        failures.append("buckets outside [0, k)")
    if c > 1 and (buckets.sort(dim=1).values.diff(dim=1) == 0).any():
        failures.append("a coordinate repeats a bucket")
    block = torch.div(buckets, width, rounding_mode="floor")
    if not torch.equal(block, torch.arange(c).expand(d, c)):
        failures.append("copy j is not in block j")
    return failures


def occupancy_pvalue(codes: torch.Tensor, k: int, c: int) -> float:
    """Two-sided chi-square p-value of the bucket counts against uniform within each block.

    Each block receives one entry per coordinate (d in all) over w = k / c buckets: expected
    d / w per bucket; c block totals are fixed, so k - c degrees of freedom.
    """
    buckets, _ = decode(codes)
    counts = torch.bincount(buckets.reshape(-1), minlength=k).double()
    expected = codes.shape[0] / (k // c)
    statistic = float(((counts - expected) ** 2 / expected).sum())
    upper = float(scipy.stats.chi2.sf(statistic, k - c))
    return 2 * min(upper, 1 - upper)


def sign_balance_z(codes: torch.Tensor) -> float:
    """z of the number of -1 signs against Binomial(d c, 1/2)."""
    n = codes.numel()
    return float(((codes < 0).sum() - n / 2) / math.sqrt(n / 4))


def sjlt_inner_product_variance(u: torch.Tensor, v: torch.Tensor, k: int) -> float:
    """Var <Su, Sv> over tables (module doc), u and v float64 (D,)."""
    return float(
        (u.dot(u) * v.dot(v) + u.dot(v) ** 2 - 2 * (u**2 * v**2).sum()) / k
    )


def mask_inner_product_variance(u: torch.Tensor, v: torch.Tensor, kept: int) -> float:
    """Var <Mu, Mv> over uniform kept-subsets (module doc), u and v float64 (D,)."""
    d = u.numel()
    a = u * v
    population = float(((a - a.mean()) ** 2).mean())
    return (d / kept) ** 2 * kept * (d - kept) / (d - 1) * population


def moment_z(estimates: torch.Tensor, mean: float, variance: float) -> tuple[float, float]:
    """z of the sample mean against ``mean`` and of the sample variance against ``variance``.

    The standard error of the sample variance is taken from the samples' own fourth moment
    (estimates of a sum of products are not Gaussian), which keeps the test exact in level.
    """
    n = estimates.numel()
    z_mean = float((estimates.mean() - mean) / math.sqrt(variance / n))
    squares = (estimates - estimates.mean()) ** 2
    z_var = float((squares.mean() - variance) / (squares.std() / math.sqrt(n)))
    return z_mean, z_var


def sketch_with_table(codes: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """S x from the definition: x (D,) float64 -> (k,), y[h_j(i)] += s_j(i) x_i / sqrt(c)."""
    buckets, signs = decode(codes)
    values = (x[:, None] * signs / math.sqrt(codes.shape[1])).reshape(-1)
    return torch.zeros(k, dtype=torch.float64).index_add_(0, buckets.reshape(-1), values)


def table_estimates(u, v, k: int, c: int, seeds: range) -> torch.Tensor:
    """<S u, S v> for the tables of ``seeds``, each sketched here from the table itself."""
    d = u.numel()
    out = []
    for seed in seeds:
        codes = gk.sjlt_codes(d, k, c=c, seed=seed)
        out.append(float(sketch_with_table(codes, u, k).dot(sketch_with_table(codes, v, k))))
    return torch.tensor(out, dtype=torch.float64)


def table_failures(d: int, k: int, c: int, seeds: range) -> list[str]:
    """Every check of this module on the tables ``_tables.sjlt_codes`` draws for ``seeds``.

    Structure, occupancy and signs of one large table (seed 0, 40 d rows so each bucket
    expects >= 40 entries), then the variance of |Su|^2 and <Su, Sv> over ``seeds``.
    """
    big = gk.sjlt_codes(40 * d, k, c=c, seed=seeds[0])
    failures = structure_failures(big, 40 * d, k, c)
    p = occupancy_pvalue(big, k, c)
    if p < P_MIN:
        failures.append(f"bucket occupancy: chi-square p = {p:.2e}")
    z = sign_balance_z(big)
    if abs(z) > Z_MAX:
        failures.append(f"sign balance z = {z:.1f}")
    g = torch.Generator().manual_seed(123)
    u = torch.randn(d, generator=g, dtype=torch.float64)
    v = 0.5 * u + torch.randn(d, generator=g, dtype=torch.float64)
    for name, (a, b) in {"|Su|^2": (u, u), "<Su, Sv>": (u, v)}.items():
        est = table_estimates(a, b, k, c, seeds)
        z_mean, z_var = moment_z(est, float(a.dot(b)), sjlt_inner_product_variance(a, b, k))
        if abs(z_mean) > Z_MAX or abs(z_var) > Z_MAX:
            failures.append(f"{name}: mean z = {z_mean:.1f}, variance z = {z_var:.1f}")
    return failures


# --- the real tables pass --------------------------------------------------------------------

SEEDS = range(1500)


@pytest.mark.parametrize("d,k,c", [(300, 64, 1), (300, 64, 4), (257, 96, 3)])
def test_table_passes_every_check(d, k, c):
    assert table_failures(d, k, c, SEEDS) == []


def test_occupancy_is_two_sided():
    """A table spread perfectly evenly (round robin) is not random: the test rejects it."""
    d, k = 6400, 64
    even = torch.arange(d, dtype=torch.int32).remainder(k)[:, None]
    assert structure_failures(even, d, k, 1) == []
    assert occupancy_pvalue(even, k, 1) < P_MIN


@pytest.mark.parametrize("c", [1, 4])
def test_kernel_variance_matches_closed_form(c):
    """The public op (CPU kernel) over seeds: mean and variance of <Su, Sv> as derived."""
    d, k = 200, 32
    g = torch.Generator().manual_seed(7)
    u = torch.randn(d, generator=g, dtype=torch.float64)
    v = 0.6 * u + torch.randn(d, generator=g, dtype=torch.float64)
    uv = torch.stack([u, v]).float()
    est = torch.tensor(
        [float(gk.sjlt(uv, k, c=c, seed=s).double().prod(0).sum()) for s in range(2000)],
        dtype=torch.float64,
    )
    z_mean, z_var = moment_z(est, float(u.dot(v)), sjlt_inner_product_variance(u, v, k))
    assert abs(z_mean) < Z_MAX and abs(z_var) < Z_MAX, (z_mean, z_var)


def test_jl_distortion_band():
    """|Sx|^2 / |x|^2 has standard deviation sqrt(2 (1 - sum x^4 / |x|^4) / k) (module doc):
    measured within a two-sided band of +-15% around it (the z-test above bounds it tighter),
    for a flat and a spiky unit vector, through the public op."""
    d, k, c = 1000, 128, 4
    g = torch.Generator().manual_seed(3)
    flat = torch.randn(d, generator=g, dtype=torch.float64)
    spiky = flat * (torch.rand(d, generator=g) < 0.05)
    for x in (flat / flat.norm(), spiky / spiky.norm()):
        ratios = torch.cat([gk.sjlt(x[None].float(), k, c=c, seed=s).double().norm(dim=1) ** 2
                            for s in range(1500)])
        theory = math.sqrt(2 * (1 - float((x**4).sum())) / k)
        assert 0.85 < float(ratios.std()) / theory < 1.15, (float(ratios.std()), theory)


def test_mask_variance_matches_closed_form():
    d, kept = 120, 30
    g = torch.Generator().manual_seed(5)
    u = torch.randn(d, generator=g, dtype=torch.float64)
    v = 0.6 * u + torch.randn(d, generator=g, dtype=torch.float64)
    uv = torch.stack([u, v])
    est = torch.tensor(
        [float(gk.mask(uv.float(), gk.random_indices(d, kept, seed=s)).double().prod(0).sum())
         for s in range(3000)],
        dtype=torch.float64,
    )
    z_mean, z_var = moment_z(est, float(u.dot(v)), mask_inner_product_variance(u, v, kept))
    assert abs(z_mean) < Z_MAX and abs(z_var) < Z_MAX, (z_mean, z_var)


# --- wrong tables fail -----------------------------------------------------------------------


def _half_the_buckets(d: int, k: int, c: int, seed: int) -> torch.Tensor:
    """A mutant table: every copy lands in the lower half of its block."""
    g = _tables._generator(seed)
    width = k // c
    offsets = torch.randint(0, max(1, width // 2), (d, c), generator=g)
    negative = torch.randint(0, 2, (d, c), generator=g).bool()
    buckets = offsets + torch.arange(c) * width
    return torch.where(negative, ~buckets, buckets).to(torch.int32)


def _repeated_bucket(d: int, k: int, c: int, seed: int) -> torch.Tensor:
    """A mutant table: copy 1 of every coordinate reuses copy 0's bucket (own random sign)."""
    codes = DRAW_CODES(d, k, c, seed).clone()
    buckets, signs = decode(codes)
    buckets[:, 1] = buckets[:, 0]
    return torch.where(signs < 0, ~buckets, buckets).to(torch.int32)


@pytest.mark.parametrize("mutant", [_half_the_buckets, _repeated_bucket])
def test_mutant_tables_fail(monkeypatch, mutant):
    """With a wrong table patched into ``_tables``, the checks report failures: the mutant
    that keeps the block structure is caught by occupancy and variance, the other by its
    structure and its variance."""
    monkeypatch.setattr(_tables, "_sjlt_codes_cpu", mutant)
    d, k, c = 300, 64, 4
    failures = table_failures(d, k, c, SEEDS)
    assert any("variance z" in f for f in failures), failures
    if mutant is _half_the_buckets:
        assert any("occupancy" in f for f in failures), failures
    else:
        assert "a coordinate repeats a bucket" in failures
        assert "copy j is not in block j" in failures
    # The public op reads the mutant too, and the closed form sees it through the kernel.
    g = torch.Generator().manual_seed(7)
    u = torch.randn(d, generator=g, dtype=torch.float64)
    est = torch.tensor([float(gk.sjlt(u[None].float(), k, c=c, seed=s).double().norm() ** 2)
                        for s in range(1000)], dtype=torch.float64)
    _, z_var = moment_z(est, float(u.dot(u)), sjlt_inner_product_variance(u, u, k))
    assert abs(z_var) > Z_MAX
