"""Triton SJLT: y[n, h_j(i)] += s_j(i) x[n, i] / sqrt(c), x (N, D) -> (N, k) fp32.

One program per (column block, row block) of x: it reads its tile of x once, coalesced, and
scatters it into out with atomics.

Why atomics, and what keeps them cheap. out is N x k fp32 (1 MB at N = 64, k = 4096), so it
stays in L2 and every atomic resolves there, never in DRAM; the atomics are relaxed and their
result unused (fire-and-forget reductions); up to 64 rows share one tile, so each table
entry is loaded and decoded once per 64 rows. Alternatives that cut the atomic count cost
more elsewhere: privatising out per program needs a scatter into shared memory, which Triton
only offers as a one-hot tl.dot of O(D * k) work (worth it for FactSJLT's k of 64, not for a
flat k of thousands); an inverted table (coordinates per bucket) turns the scatter into a
gather that reads x at random columns; per-chunk partial outputs write N * k floats per chunk
(as much as x itself with chunks of k columns) and need a second reduction pass.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _launch
from ._tiles import scatter_to_buckets


@triton.jit
def _sjlt_kernel(x, codes, out, N, D, k, c, scale, sx_n, sx_d,
                 BN: tl.constexpr, BD: tl.constexpr):
    cols = tl.program_id(0) * BD + tl.arange(0, BD)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    row_mask = rows < N
    col_mask = cols < D
    rows64 = rows.to(tl.int64)[:, None]
    mask = row_mask[:, None] & col_mask[None, :]
    vals = tl.load(x + rows64 * sx_n + cols[None, :].to(tl.int64) * sx_d, mask=mask, other=0.0)
    scatter_to_buckets(out + rows64 * k, vals.to(tl.float32), cols[None, :], col_mask[None, :],
                       mask, codes, c, scale)


@triton_op("grass_triton::sjlt", mutates_args=())
def sjlt(x: torch.Tensor, codes: torch.Tensor, k: int) -> torch.Tensor:
    """x (N, D) float, codes int32 (D, c) -> (N, k) fp32; see ``reference.sjlt``."""
    _launch.check_matrix("x", x)
    _launch.check_codes("codes", codes, x.shape[1], x)
    _launch.check_k(k, codes)
    _launch.check_ranges(("codes", codes, k, "k"))
    n, d = x.shape
    c = codes.shape[1]
    codes = codes.contiguous()
    out = torch.zeros(n, k, dtype=torch.float32, device=x.device)
    if n == 0:
        return out
    grid, bn, bd = _launch.flat_grid(n, d)
    wrap_triton(_sjlt_kernel)[grid](
        x, codes, out, n, d, k, c, 1.0 / math.sqrt(c), x.stride(0), x.stride(1),
        BN=bn, BD=bd, num_warps=_launch.FLAT_WARPS,
    )
    return out
