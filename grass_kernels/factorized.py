"""Factorized compressors for linear layers: compressed per-example weight gradients straight
from the layer's inputs and output gradients, never forming G_i = sum_t delta_t x_t^T.

Inputs (all ops):
    acts        (B, T, d_in) or (B, d_in)      float32 / bfloat16 / float16
    grads       (B, T, d_out) or (B, d_out)    same B and T as acts
    bias        append a virtual constant-1 input column at index d_in (acts is not copied)
    token_mask  optional (B, T), bool or float; masked tokens contribute nothing
    out_dtype   dtype of the result (accumulation is always fp32); default float32
"""

from __future__ import annotations

import math

import torch

from . import _checks, _tables
from ._backend import run


def _prepare(acts, grads, token_mask, out_dtype):
    acts, grads = _checks.acts_and_grads(acts, grads)
    mask = _checks.token_mask(token_mask, acts.shape[0], acts.shape[1], acts)
    return acts, grads, mask, _checks.out_dtype(out_dtype)


def logra(
    acts: torch.Tensor,
    grads: torch.Tensor,
    *,
    p_in: torch.Tensor,
    p_out: torch.Tensor,
    bias: bool = False,
    token_mask: torch.Tensor | None = None,
    backend: str | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """LoGra: flatten(P_out G_i P_in^T) per example, (B, k_out * k_in), row-major (k_out, k_in).

    p_in (k_in, d_in + bias) and p_out (k_out, d_out) are float projections on acts' device,
    e.g. ``gaussian_matrix(k_in, d_in + bias, seed=...)``.
    """
    acts, grads, mask, dtype = _prepare(acts, grads, token_mask, out_dtype)
    d_in = acts.shape[2] + int(bias)
    for name, p, width in (("p_in", p_in, d_in), ("p_out", p_out, grads.shape[2])):
        _checks.floating(name, p)
        _checks.ndim(name, p, (2,), "(k, d)")
        _checks.same_device(name, p, "acts", acts)
        if p.shape[1] != width:
            hint = " (bias=True adds one input column)" if name == "p_in" and bias else ""
            raise ValueError(f"{name} must have {width} columns{hint}; got shape {tuple(p.shape)}")
    p_in, p_out = p_in.float().contiguous(), p_out.float().contiguous()
    out = run("logra", backend, acts.device, acts, grads, p_in, p_out, mask, bool(bias))
    return out.to(dtype)


def fact_grass(
    acts: torch.Tensor,
    grads: torch.Tensor,
    k: int,
    *,
    in_indices: torch.Tensor,
    out_indices: torch.Tensor,
    c: int = 1,
    seed: int = 0,
    bias: bool = False,
    token_mask: torch.Tensor | None = None,
    backend: str | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """FactGraSS: mask both sides of G_i, then SJLT to k; (B, k).

    == sjlt(flatten(G_i[out_indices][:, in_indices]) * sqrt(d_out * d_in' / (k_o' * k_i')),
            k, c=c, seed=seed)
    with in_indices (k_i',) into [0, d_in + bias) and out_indices (k_o',) into [0, d_out).
    """
    acts, grads, mask, dtype = _prepare(acts, grads, token_mask, out_dtype)
    k, c = _checks.sjlt_sizes(k, c)
    d_in, d_out = acts.shape[2] + int(bias), grads.shape[2]
    idx_in = _checks.indices("in_indices", in_indices, d_in, "acts", acts)
    idx_out = _checks.indices("out_indices", out_indices, d_out, "acts", acts)
    reduced = idx_in.numel() * idx_out.numel()
    codes = _tables.sjlt_codes(reduced, k, c, seed, acts.device)
    scale = math.sqrt(d_out * d_in / reduced)
    out = run(
        "fact_grass", backend, acts.device,
        acts, grads, idx_in, idx_out, codes, k, scale, mask, bool(bias),
    )
    return out.to(dtype)


def fact_sjlt(
    acts: torch.Tensor,
    grads: torch.Tensor,
    *,
    k_in: int,
    k_out: int,
    c: int = 1,
    seed_in: int = 0,
    seed_out: int = 1,
    bias: bool = False,
    token_mask: torch.Tensor | None = None,
    backend: str | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """FactSJLT: a Kronecker SJLT, flatten(sjlt(Delta, k_out)^T sjlt(X, k_in)) per example.

    Reads every coordinate (no mask bias); (B, k_out * k_in), row-major (k_out, k_in).
    """
    acts, grads, mask, dtype = _prepare(acts, grads, token_mask, out_dtype)
    k_in, c = _checks.sjlt_sizes(k_in, c)
    k_out, _ = _checks.sjlt_sizes(k_out, c)
    d_in, d_out = acts.shape[2] + int(bias), grads.shape[2]
    codes_in = _tables.sjlt_codes(d_in, k_in, c, seed_in, acts.device)
    codes_out = _tables.sjlt_codes(d_out, k_out, c, seed_out, acts.device)
    out = run(
        "fact_sjlt", backend, acts.device,
        acts, grads, codes_in, codes_out, k_in, k_out, mask, bool(bias),
    )
    return out.to(dtype)
