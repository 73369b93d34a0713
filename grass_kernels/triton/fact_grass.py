"""Triton FactGraSS, fused: gather the masked columns of X and Delta, multiply over the tokens,
and scatter the (k_o' x k_i') reduced gradient into the SJLT buckets, (B, k) fp32.

Grid: (example, token split, tile of the reduced gradient). A program gathers its out_indices
columns of Delta and in_indices columns of X for its T-tiles, accumulates the
(BO x BI) tile of Delta[S_o]^T X[S_i] in registers with tl.dot, scales it and adds it into
the example's k buckets with atomics. Nothing of size B * k_o' * k_i' is written to memory;
the SJLT being linear, programs that split an example's tokens scatter their partial tiles
independently. Atomics per call: B * splits * k_o' * k_i' * c, against B * T * (k_o' + k_i')
gathered loads; ``_launch.token_splits`` keeps splits at what fills the GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _launch
from ._tiles import dot, load_inputs, scatter_to_buckets


@triton.jit
def _fact_grass_kernel(acts, grads, in_indices, out_indices, codes, token_mask, out,
                       T, d_in, n_in, n_out, k, c, scale,
                       sa_b, sa_t, sa_d, sg_b, sg_t, sg_d, sm_b, sm_t,
                       BIAS: tl.constexpr, HAS_MASK: tl.constexpr, NATIVE: tl.constexpr,
                       BT: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    tiles_in = tl.cdiv(n_in, BI)
    oo = (tl.program_id(2) // tiles_in) * BO + tl.arange(0, BO)
    ii = (tl.program_id(2) % tiles_in) * BI + tl.arange(0, BI)
    o_mask = oo < n_out
    i_mask = ii < n_in
    cols_out = tl.load(out_indices + oo, mask=o_mask, other=0)
    cols_in = tl.load(in_indices + ii, mask=i_mask, other=0)
    acts_cols = acts + b * sa_b + cols_in[None, :] * sa_d
    grads_cols = grads + b * sg_b + cols_out[None, :] * sg_d
    acc = tl.zeros((BO, BI), tl.float32)
    for t0 in range(tl.program_id(1) * BT, T, tl.num_programs(1) * BT):
        t = t0 + tl.arange(0, BT)
        t_mask = (t < T)[:, None]
        t64 = t.to(tl.int64)[:, None]
        x = load_inputs(acts_cols + t64 * sa_t, t_mask & i_mask[None, :], cols_in[None, :],
                        d_in, BIAS)
        g = tl.load(grads_cols + t64 * sg_t, mask=t_mask & o_mask[None, :], other=0.0)
        if HAS_MASK:
            m = tl.load(token_mask + b * sm_b + t * sm_t, mask=t < T, other=0.0)
            if NATIVE:  # tensor cores multiply in the inputs' 16-bit dtype: round to it
                g = (g.to(tl.float32) * m[:, None]).to(g.dtype)
            else:  # fp32 products: keep the masked rows exact
                g = g.to(tl.float32) * m[:, None]
        acc = dot(tl.trans(g), x, acc, NATIVE)
    pos = oo[:, None] * n_in + ii[None, :]
    pos_mask = (oo < n_out)[:, None] & (ii < n_in)[None, :]
    scatter_to_buckets(out + b * k, acc, pos, pos_mask, o_mask[:, None] & i_mask[None, :],
                       codes, c, scale)


def launch(acts: torch.Tensor, grads: torch.Tensor, in_indices: torch.Tensor,
           out_indices: torch.Tensor, codes: torch.Tensor, k: int, scale: float,
           token_mask: torch.Tensor | None, bias: bool, splits: int | None = None) -> torch.Tensor:
    """The op, with the number of programs per example's tokens open (tests force > 1)."""
    _launch.check_linear(acts, grads, token_mask)
    _launch.check_index("in_indices", in_indices, acts)
    _launch.check_index("out_indices", out_indices, acts)
    n_in, n_out = in_indices.shape[0], out_indices.shape[0]
    _launch.check_codes("codes", codes, n_in * n_out, acts)
    _launch.check_k(k, codes)
    _launch.check_ranges(("in_indices", in_indices, acts.shape[2] + bias, None),
                         ("out_indices", out_indices, grads.shape[2], None),
                         ("codes", codes, k, "k"))
    b, t, d_in = acts.shape
    c = codes.shape[1]
    in_indices, out_indices = in_indices.contiguous(), out_indices.contiguous()
    codes = codes.contiguous()
    out = torch.zeros(b, k, dtype=torch.float32, device=acts.device)
    bo, bi = _launch.block_k(n_out), _launch.block_k(n_in)
    tiles = triton.cdiv(n_out, bo) * triton.cdiv(n_in, bi)
    if splits is None:
        splits = _launch.token_splits(acts.device, b * tiles, t)
    sm_b, sm_t = _launch.mask_strides(token_mask)
    wrap_triton(_fact_grass_kernel)[(b, splits, tiles)](
        acts, grads, in_indices, out_indices, codes, token_mask, out,
        t, d_in, n_in, n_out, k, c, scale / math.sqrt(c),
        *acts.stride(), *grads.stride(), sm_b, sm_t,
        BIAS=bias, HAS_MASK=token_mask is not None,
        NATIVE=_launch.native_dot(_fact_grass_kernel, acts, grads),
        BT=_launch.BLOCK_T, BO=bo, BI=bi, num_warps=_launch.DOT_WARPS,
        num_stages=_launch.DOT_STAGES,
    )
    return out


@triton_op("grass_triton::fact_grass", mutates_args=())
def fact_grass(acts: torch.Tensor, grads: torch.Tensor, in_indices: torch.Tensor,
               out_indices: torch.Tensor, codes: torch.Tensor, k: int, scale: float,
               token_mask: torch.Tensor | None, bias: bool) -> torch.Tensor:
    """acts (B, T, d_in), grads (B, T, d_out) -> (B, k) fp32; see ``reference.fact_grass``."""
    return launch(acts, grads, in_indices, out_indices, codes, k, scale, token_mask, bias)
