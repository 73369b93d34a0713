"""Triton LoGra, fused: flatten(P_out G_i P_in^T) per example straight from X and Delta,
(B, k_out * k_in) fp32, row-major over (k_out, k_in).

Grid: (example, token split, (k_out x k_in) tile). Per T-tile a program projects X with
P_in and Delta with P_out by tl.dot over d, then accumulates the outer product of the two
projections in registers (``_tiles.outer_sketch_program``). X and Delta are read once per
output tile (once in all at LoGra's usual k_out, k_in <= 64); the (B, T, k) projections
never reach memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _launch
from ._tiles import outer_sketch_program


@triton.jit
def _logra_kernel(acts, grads, p_in, p_out, token_mask, out,
                  T, d_in, d_out, k_in, k_out,
                  sa_b, sa_t, sa_d, sg_b, sg_t, sg_d, sm_b, sm_t,
                  spi_k, spi_d, spo_k, spo_d,
                  BIAS: tl.constexpr, HAS_MASK: tl.constexpr, NATIVE: tl.constexpr,
                  ATOMIC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                  BKO: tl.constexpr, BKI: tl.constexpr):
    outer_sketch_program(acts, sa_b, sa_t, sa_d, d_in, grads, sg_b, sg_t, sg_d, d_out,
                         token_mask, sm_b, sm_t, T,
                         p_in, spi_k, spi_d, p_out, spo_k, spo_d, 1,
                         out, k_in, k_out, 1.0,
                         BIAS, HAS_MASK, False, NATIVE, ATOMIC, BT, BD, BKO, BKI)


def launch(acts: torch.Tensor, grads: torch.Tensor, p_in: torch.Tensor, p_out: torch.Tensor,
           token_mask: torch.Tensor | None, bias: bool, splits: int | None = None) -> torch.Tensor:
    """The op, with the number of programs per example's tokens open (tests force > 1)."""
    _launch.check_linear(acts, grads, token_mask)
    for name, p, width in (("p_in", p_in, acts.shape[2] + bias), ("p_out", p_out, grads.shape[2])):
        _launch.check_projection(name, p, width, acts)
    k_in, k_out = p_in.shape[0], p_out.shape[0]
    grid, meta = _launch.outer_launch(_logra_kernel, acts, grads, k_out, k_in, token_mask, bias,
                                      splits)
    out = torch.zeros(acts.shape[0], k_out * k_in, dtype=torch.float32, device=acts.device)
    wrap_triton(_logra_kernel)[grid](
        acts, grads, p_in, p_out, token_mask, out,
        acts.shape[1], acts.shape[2], grads.shape[2], k_in, k_out,
        *acts.stride(), *grads.stride(), *_launch.mask_strides(token_mask),
        *p_in.stride(), *p_out.stride(),
        **meta,
    )
    return out


@triton_op("grass_triton::logra", mutates_args=())
def logra(acts: torch.Tensor, grads: torch.Tensor, p_in: torch.Tensor, p_out: torch.Tensor,
          token_mask: torch.Tensor | None, bias: bool) -> torch.Tensor:
    """acts (B, T, d_in), grads (B, T, d_out), p_in (k_in, d_in + bias), p_out (k_out, d_out)
    -> (B, k_out * k_in) fp32; see ``reference.logra``."""
    return launch(acts, grads, p_in, p_out, token_mask, bias)
