"""Flat compressors: act on rows of a matrix x (N, D).

``sjlt``, ``sjlt_transpose`` and ``grass`` dispatch to a kernel (see ``_backend``); ``mask`` is
a gather and ``gaussian`` a GEMM, both in torch. Every op returns fp32 whatever the input dtype.
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


def sjlt(
    x: torch.Tensor, k: int, *, c: int = 1, seed: int = 0, backend: str | None = None
) -> torch.Tensor:
    """Sparse JL transform of each row: every coordinate i goes to c distinct buckets (one per
    block of k / c) with random signs, scaled by 1 / sqrt(c), so E<sjlt(u), sjlt(v)> = <u, v>.
    Cost O(c * N * D).

    Arguments:
        x        (N, D) float32 / bfloat16 / float16
        k        int > 0, output size, divisible by c
        c        int, 1 <= c <= k, buckets per coordinate
        seed     int, the table's seed (``sjlt_codes(D, k, c=c, seed=seed)``)
        backend  None (by device), "reference", "cpu", "cuda" or "triton"
    Returns:
        (N, k) float32
    """
    _matrix("x", x)
    codes = _tables.sjlt_codes(x.shape[1], k, c=c, seed=seed, device=x.device)
    return run("sjlt", backend, x.device, x, codes, k)


def sjlt_transpose(
    y: torch.Tensor, d: int, *, c: int = 1, seed: int = 0, backend: str | None = None
) -> torch.Tensor:
    """The adjoint of ``sjlt(., k, c=c, seed=seed)`` on (N, d) inputs, k = y.shape[1]:
    x[n, i] = sum_j s_j(i) y[n, h_j(i)] / sqrt(c).

    Arguments:
        y        (N, k) float32 / bfloat16 / float16, k divisible by c
        d        int > 0, output size (the input size of the sjlt it undoes)
        c        int, 1 <= c <= k, buckets per coordinate
        seed     int, the table's seed
        backend  None (by device), "reference", "cpu", "cuda" or "triton"
    Returns:
        (N, d) float32
    """
    _matrix("y", y)
    codes = _tables.sjlt_codes(d, y.shape[1], c=c, seed=seed, device=y.device)
    return run("sjlt_transpose", backend, y.device, y, codes)


def mask(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Random-mask compression: x[:, indices] * sqrt(D / k'), unbiased for inner products.

    Arguments:
        x        (N, D) float32 / bfloat16 / float16
        indices  (k',) int64 / int32, distinct, in [0, D), on x's device
                 (e.g. ``random_indices(D, k')``)
    Returns:
        (N, k') float32
    """
    _matrix("x", x)
    idx = _checks.indices("indices", indices, x.shape[1], "x", x)
    return x.index_select(1, idx).float() * math.sqrt(x.shape[1] / idx.numel())


def grass(
    x: torch.Tensor,
    k: int,
    *,
    indices: torch.Tensor,
    c: int = 1,
    seed: int = 0,
    backend: str | None = None,
) -> torch.Tensor:
    """Mask then SJLT in one pass: == sjlt(mask(x, indices), k, c=c, seed=seed). Reads only the
    k' = len(indices) selected columns of x: cost O(c * N * k'), sub-linear in D.

    Arguments:
        x        (N, D) float32 / bfloat16 / float16
        k        int > 0, output size, divisible by c
        indices  (k',) int64 / int32, distinct, in [0, D), on x's device
        c        int, 1 <= c <= k, buckets per coordinate
        seed     int, the SJLT table's seed (``sjlt_codes(k', k, c=c, seed=seed)``)
        backend  None (by device), "reference", "cpu", "cuda" or "triton"
    Returns:
        (N, k) float32
    """
    _matrix("x", x)
    idx = _checks.indices("indices", indices, x.shape[1], "x", x)
    codes = _tables.sjlt_codes(idx.numel(), k, c=c, seed=seed, device=x.device)
    scale = math.sqrt(x.shape[1] / idx.numel())
    return run("grass", backend, x.device, x, idx, codes, k, scale)


# Keep the streamed matrix chunk under ~256 MB (fp32) whatever k is.
_GAUSSIAN_CACHE_BYTES = 1 << 28


def gaussian(x: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """Dense N(0, 1/k) projection (the TRAK-style baseline): x @ gaussian_matrix(D, k).T,
    O(N * D * k). The (k, D) matrix is cached when it fits in 256 MB and otherwise drawn chunk
    by chunk on every call (it is 16 GB at D = 1e6, k = 4096); both give the same matrix.

    Arguments:
        x     (N, D) float32 / bfloat16 / float16
        k     int > 0, output size
        seed  int, the matrix's seed
    Returns:
        (N, k) float32
    """
    _matrix("x", x)
    k = _checks.positive_int("k", k)
    d = x.shape[1]
    if k * d * 4 <= _GAUSSIAN_CACHE_BYTES:
        return x.float() @ _tables.gaussian_matrix(d, k, seed=seed, device=x.device).T
    step = max(_tables.GAUSSIAN_CHUNK, (_GAUSSIAN_CACHE_BYTES // (4 * k)))
    step -= step % _tables.GAUSSIAN_CHUNK
    out = torch.zeros(x.shape[0], k, dtype=torch.float32, device=x.device)
    for lo in range(0, d, step):
        hi = min(d, lo + step)
        chunk = _tables.gaussian_chunk(d, k, lo, hi, seed).to(x.device)
        out.addmm_(x[:, lo:hi].float(), chunk.T)
    return out
