"""Triton GraSS: mask then SJLT in one pass, sjlt(x[:, indices] * scale), (N, D) -> (N, k) fp32.

One program per (block of mask positions, row block): it loads its slice of ``indices`` once,
gathers those columns of x for all its rows (only the k' selected columns are ever read, so
the cost is sub-linear in D), and scatters them into the buckets exactly as the SJLT kernel
does (see ``sjlt.py`` for why atomics).
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
def _grass_kernel(x, indices, codes, out, N, n_idx, k, c, scale, sx_n, sx_d,
                  BN: tl.constexpr, BD: tl.constexpr):
    pos = tl.program_id(0) * BD + tl.arange(0, BD)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    pos_mask = pos < n_idx
    cols = tl.load(indices + pos, mask=pos_mask, other=0)
    rows64 = rows.to(tl.int64)[:, None]
    mask = (rows < N)[:, None] & pos_mask[None, :]
    vals = tl.load(x + rows64 * sx_n + cols[None, :] * sx_d, mask=mask, other=0.0)
    scatter_to_buckets(out + rows64 * k, vals.to(tl.float32), pos[None, :], pos_mask[None, :],
                       mask, codes, c, scale)


@triton_op("grass_triton::grass", mutates_args=())
def grass(x: torch.Tensor, indices: torch.Tensor, codes: torch.Tensor, k: int,
          scale: float) -> torch.Tensor:
    """x (N, D), indices int64 (k',), codes int32 (k', c) -> (N, k) fp32.

    See ``reference.grass``.
    """
    _launch.check_matrix("x", x)
    _launch.check_index("indices", indices, x)
    _launch.check_codes("codes", codes, indices.shape[0], x)
    _launch.check_k(k, codes)
    _launch.check_ranges(("codes", codes, k, "k"), ("indices", indices, x.shape[1], None))
    n, d = x.shape
    n_idx, c = codes.shape
    indices, codes = indices.contiguous(), codes.contiguous()
    out = torch.zeros(n, k, dtype=torch.float32, device=x.device)
    if n == 0:
        return out
    grid, bn, bd = _launch.flat_grid(n, n_idx)
    wrap_triton(_grass_kernel)[grid](
        x, indices, codes, out, n, n_idx, k, c, scale / math.sqrt(c),
        x.stride(0), x.stride(1), BN=bn, BD=bd, num_warps=_launch.FLAT_WARPS,
    )
    return out
