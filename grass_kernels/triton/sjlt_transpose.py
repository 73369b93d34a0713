"""Triton adjoint SJLT: x[n, i] = sum_j s_j(i) y[n, h_j(i)] / sqrt(c), y (N, k) -> (N, D) fp32.

A gather, so no atomics: one program per (column block of the output, row block) decodes the
table entries of its columns once for all its rows and reads y at those buckets (y is N x k,
small enough to stay in L2), then writes its tile of the output once.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _launch
from ._tiles import decode


@triton.jit
def _sjlt_transpose_kernel(y, codes, out, N, D, c, scale, sy_n, sy_k,
                           BN: tl.constexpr, BD: tl.constexpr):
    cols = tl.program_id(0) * BD + tl.arange(0, BD)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    col_mask = cols < D
    rows64 = rows.to(tl.int64)[:, None]
    mask = (rows < N)[:, None] & col_mask[None, :]
    acc = tl.zeros((BN, BD), tl.float32)
    for j in range(c):
        code = tl.load(codes + cols * c + j, mask=col_mask, other=0)
        bucket, negative = decode(code)
        vals = tl.load(y + rows64 * sy_n + bucket[None, :].to(tl.int64) * sy_k,
                       mask=mask, other=0.0).to(tl.float32)
        acc += tl.where(negative[None, :], -vals, vals)
    tl.store(out + rows64 * D + cols[None, :], acc * scale, mask=mask)


@triton_op("grass_triton::sjlt_transpose", mutates_args=())
def sjlt_transpose(y: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """y (N, k) float, codes int32 (D, c) -> (N, D) fp32; see ``reference.sjlt_transpose``."""
    _launch.check_matrix("y", y)
    _launch.check_codes("codes", codes, None, y)
    _launch.check_k(y.shape[1], codes)
    _launch.check_ranges(("codes", codes, y.shape[1], "k"))
    n, k = y.shape
    d, c = codes.shape
    codes = codes.contiguous()
    out = torch.empty(n, d, dtype=torch.float32, device=y.device)
    if n == 0:
        return out
    grid, bn, bd = _launch.flat_grid(n, d)
    wrap_triton(_sjlt_transpose_kernel)[grid](
        y, codes, out, n, d, c, 1.0 / math.sqrt(c), y.stride(0), y.stride(1),
        BN=bn, BD=bd, num_warps=_launch.FLAT_WARPS,
    )
    return out
