"""Triton FactSJLT, fused: flatten(sjlt(Delta, k_out)^T sjlt(X, k_in)) per example,
(B, k_out * k_in) fp32, row-major over (k_out, k_in).

The hash-scatter of each token into its k_in / k_out sketch is done as a product: per
(d-block, k-tile) the kernel builds the +-1 sign matrix of the SJLT in registers from the
codes (``_tiles.sign_tile``) and multiplies the token tile by it with tl.dot, which turns the
scatter into tensor-core work, needs no atomics, and is exact in any input dtype. The
sketches are then combined by an outer product accumulated in registers, exactly as in LoGra
(``_tiles.outer_sketch_program``); the two 1/sqrt(c) factors are applied once at the end.
The products cost 2 * d * k_in per token, cheap at the k_in, k_out <= 64 that FactSJLT uses
per side; with larger k the sketches are recomputed for every output tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _launch
from ._tiles import outer_sketch_program


@triton.jit
def _fact_sjlt_kernel(acts, grads, codes_in, codes_out, token_mask, out,
                      T, d_in, d_out, k_in, k_out, c, scale,
                      sa_b, sa_t, sa_d, sg_b, sg_t, sg_d, sm_b, sm_t,
                      BIAS: tl.constexpr, HAS_MASK: tl.constexpr, NATIVE: tl.constexpr,
                      ATOMIC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                      BKO: tl.constexpr, BKI: tl.constexpr):
    # The code tables are contiguous (d, c); the (k, d) strides of a dense P are unused.
    outer_sketch_program(acts, sa_b, sa_t, sa_d, d_in, grads, sg_b, sg_t, sg_d, d_out,
                         token_mask, sm_b, sm_t, T,
                         codes_in, 0, c, codes_out, 0, c, c,
                         out, k_in, k_out, scale,
                         BIAS, HAS_MASK, True, NATIVE, ATOMIC, BT, BD, BKO, BKI)


def launch(acts: torch.Tensor, grads: torch.Tensor, codes_in: torch.Tensor,
           codes_out: torch.Tensor, k_in: int, k_out: int, token_mask: torch.Tensor | None,
           bias: bool, splits: int | None = None) -> torch.Tensor:
    """The op, with the number of programs per example's tokens open (tests force > 1)."""
    _launch.check_linear(acts, grads, token_mask)
    _launch.check_codes("codes_in", codes_in, acts.shape[2] + bias, acts)
    _launch.check_codes("codes_out", codes_out, grads.shape[2], acts)
    _launch.check_k(k_in, codes_in, "k_in")
    _launch.check_k(k_out, codes_out, "k_out")
    _launch.check_ranges(("codes_in", codes_in, k_in, "k_in"),
                         ("codes_out", codes_out, k_out, "k_out"))
    if codes_in.shape[1] != codes_out.shape[1]:
        raise ValueError(f"codes_in and codes_out must have the same c; got "
                         f"{codes_in.shape[1]} and {codes_out.shape[1]}")
    c = codes_in.shape[1]
    codes_in, codes_out = codes_in.contiguous(), codes_out.contiguous()
    grid, meta = _launch.outer_launch(_fact_sjlt_kernel, acts, grads, k_out, k_in, token_mask,
                                      bias, splits)
    out = torch.zeros(acts.shape[0], k_out * k_in, dtype=torch.float32, device=acts.device)
    wrap_triton(_fact_sjlt_kernel)[grid](
        acts, grads, codes_in, codes_out, token_mask, out,
        acts.shape[1], acts.shape[2], grads.shape[2], k_in, k_out, c, 1.0 / c,
        *acts.stride(), *grads.stride(), *_launch.mask_strides(token_mask),
        **meta,
    )
    return out


@triton_op("grass_triton::fact_sjlt", mutates_args=())
def fact_sjlt(acts: torch.Tensor, grads: torch.Tensor, codes_in: torch.Tensor,
              codes_out: torch.Tensor, k_in: int, k_out: int,
              token_mask: torch.Tensor | None, bias: bool) -> torch.Tensor:
    """acts (B, T, d_in), grads (B, T, d_out), codes_in (d_in + bias, c), codes_out (d_out, c)
    -> (B, k_out * k_in) fp32; see ``reference.fact_sjlt``."""
    return launch(acts, grads, codes_in, codes_out, k_in, k_out, token_mask, bias)
