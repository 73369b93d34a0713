"""Flat compressors: act on rows of a matrix x (N, D).

``sjlt``, ``sjlt_transpose`` and ``grass`` dispatch to a kernel (see ``_backend``); ``mask`` is
a gather and ``gaussian`` a GEMM, both in torch.
"""

from __future__ import annotations

import math

import torch

from . import _checks, _tables
from ._backend import run


def _matrix(name: str, x) -> torch.Tensor:
    _checks.floating(name, x)
    _checks.ndim(name, x, (2,), "(N, D)")
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have D >= 1 columns; got shape {tuple(x.shape)}")
    return x


def _check_table_fits(d: int, c: int) -> None:
    # Tables are int32 (d, c); kernels index them with 32-bit offsets.
    if d * c >= 2**31:
        raise ValueError(f"d * c must be below 2**31 for the SJLT table; got d = {d}, c = {c}")


def sjlt(
    x: torch.Tensor, k: int, *, c: int = 1, seed: int = 0, backend: str | None = None
) -> torch.Tensor:
    """Sparse JL transform of each row: x (N, D) float -> (N, k) fp32.

    Each coordinate i goes to c distinct buckets (one per block of k / c) with random signs,
    scaled by 1 / sqrt(c): E<sjlt(u), sjlt(v)> = <u, v>. Cost O(c * N * D).
    """
    _matrix("x", x)
    k, c = _checks.sjlt_sizes(k, c)
    _check_table_fits(x.shape[1], c)
    codes = _tables.sjlt_codes(x.shape[1], k, c, seed, x.device)
    return run("sjlt", backend, x.device, x, codes, k)


def sjlt_transpose(
    y: torch.Tensor, d: int, *, c: int = 1, seed: int = 0, backend: str | None = None
) -> torch.Tensor:
    """The adjoint of ``sjlt(., k=y.shape[1], c=c, seed=seed)``: y (N, k) -> (N, d) fp32."""
    _matrix("y", y)
    k, c = _checks.sjlt_sizes(y.shape[1], c)
    d = _checks.positive_int("d", d)
    _check_table_fits(d, c)
    codes = _tables.sjlt_codes(d, k, c, seed, y.device)
    return run("sjlt_transpose", backend, y.device, y, codes)


def random_indices(d: int, k: int, *, seed: int = 0, device=None) -> torch.Tensor:
    """A uniform random subset of [0, d) of size k: sorted int64 (k,) on ``device`` (default
    the CPU); the same (d, k, seed) gives the same subset on every device."""
    return _tables.random_indices(d, k, seed=seed, device=device)


def mask(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Random-mask compression: x[:, indices] * sqrt(D / k'), (N, D) -> (N, k') in x's dtype."""
    _matrix("x", x)
    idx = _checks.indices("indices", indices, x.shape[1], "x", x)
    return x.index_select(1, idx) * math.sqrt(x.shape[1] / idx.numel())


def grass(
    x: torch.Tensor,
    k: int,
    *,
    indices: torch.Tensor,
    c: int = 1,
    seed: int = 0,
    backend: str | None = None,
) -> torch.Tensor:
    """Mask then SJLT in one pass: == sjlt(mask(x, indices), k, c=c, seed=seed), (N, k) fp32.

    Reads only the k' = len(indices) selected columns of x: cost O(c * N * k'), sub-linear in D.
    """
    _matrix("x", x)
    k, c = _checks.sjlt_sizes(k, c)
    idx = _checks.indices("indices", indices, x.shape[1], "x", x)
    codes = _tables.sjlt_codes(idx.numel(), k, c, seed, x.device)
    scale = math.sqrt(x.shape[1] / idx.numel())
    return run("grass", backend, x.device, x, idx, codes, k, scale)


# Keep the streamed matrix chunk under ~256 MB (fp32) whatever k is.
_GAUSSIAN_CACHE_BYTES = 1 << 28


def gaussian(x: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """Dense N(0, 1/k) projection (the TRAK-style baseline): (N, D) -> (N, k) fp32, O(N * D * k).

    The (k, D) matrix is cached when it fits in 256 MB and otherwise drawn chunk by chunk on
    every call (it is 16 GB at D = 1e6, k = 4096); both give the same matrix.
    """
    _matrix("x", x)
    k = _checks.positive_int("k", k)
    d = x.shape[1]
    if k * d * 4 <= _GAUSSIAN_CACHE_BYTES:
        return x.float() @ _tables.gaussian_matrix(k, d, seed=seed, device=x.device).T
    step = max(_tables.GAUSSIAN_CHUNK, (_GAUSSIAN_CACHE_BYTES // (4 * k)))
    step -= step % _tables.GAUSSIAN_CHUNK
    out = torch.zeros(x.shape[0], k, dtype=torch.float32, device=x.device)
    for lo in range(0, d, step):
        hi = min(d, lo + step)
        chunk = _tables.gaussian_chunk(k, d, lo, hi, seed).to(x.device)
        out.addmm_(x[:, lo:hi].float(), chunk.T)
    return out
