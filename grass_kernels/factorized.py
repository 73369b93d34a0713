"""Factorized compressors for linear layers: compressed per-example weight gradients straight
from the layer's inputs and output gradients, never forming G_i = sum_t delta_t x_t^T.

Inputs (all ops; acts and grads are the only positional arguments, every size is a keyword):
    acts        (B, T, d_in) or (B, d_in)      float32 / bfloat16 / float16
    grads       (B, T, d_out) or (B, d_out)    float, same B and T as acts
    bias        append a virtual constant-1 input column at index d_in (acts is not copied)
    token_mask  optional (B, T), bool or float; masked tokens contribute nothing
    backend     None (by device), "reference", "cpu", "cuda" or "triton"
    out_dtype   dtype of the result (accumulation is always fp32); default float32
    path        "auto", "factorized" or "materialize"

Path choice: the fused kernels cost O(T * (d_in + d_out)) work per example to project, sketch
or gather the tokens plus O(T * k_out * k_in) for the outer products. For long sequences through
small layers, forming G_i = Delta_i^T X_i (O(T * d_out * d_in)) and compressing it once is
cheaper. ``path="auto"`` compares the two FLOP counts (``_flops``); ``"factorized"`` forces the
fused kernel, ``"materialize"`` forms G_i a block of examples at a time (``linear_grads``) and
compresses it with the flat op of the same backend. For ``fact_grass`` the fused kernel forms
only the masked k_o' x k_i' gradient, so "auto" always picks it.
"""

from __future__ import annotations

import math

import torch

from . import _checks, _tables
from ._backend import resolve, run
from .linear import BLOCK_FLOATS, blocks

PATHS = ("auto", "factorized", "materialize")


def _flops(op: str, t: int, d_in: int, d_out: int, k_in: int, k_out: int, c: int = 1):
    """Per-example (factorized, materialize) FLOP counts; a scatter-add counts as 2 FLOPs.

    d_in includes the bias column. logra: project both sides, then the outer products, vs
    G_i then P_out G_i P_in^T. fact_sjlt: sketch both sides (c copies), then the outer
    products, vs G_i then a row sketch (d_out rows of d_in) and a column sketch (k_in x d_out).
    fact_grass (k_in, k_out are the mask sizes k_i', k_o'): the masked outer products vs G_i,
    then both sketch the same k_o' * k_i' values.
    """
    outer, gradient = 2 * t * k_out * k_in, 2 * t * d_out * d_in
    if op == "logra":
        factorized = 2 * t * (d_in * k_in + d_out * k_out) + outer
        materialize = gradient + 2 * d_out * k_in * (d_in + k_out)
    elif op == "fact_sjlt":
        factorized = 2 * c * t * (d_in + d_out) + outer
        materialize = gradient + 2 * c * d_out * (d_in + k_in)
    else:
        sketch = 2 * c * k_out * k_in
        factorized, materialize = outer + sketch, gradient + sketch
    return factorized, materialize


def _materialized_path(path, op: str, acts, grads, bias, k_in: int, k_out: int, c: int = 1):
    """Whether ``op`` takes the materialise-then-compress path (``path``: see the module doc)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}; got {path!r}")
    if path != "auto":
        return path == "materialize"
    d_in = acts.shape[2] + int(bias)
    factorized, materialize = _flops(op, acts.shape[1], d_in, grads.shape[2], k_in, k_out, c)
    return materialize < factorized


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
    path: str = "auto",
) -> torch.Tensor:
    """LoGra: flatten(P_out G_i P_in^T) per example, row-major over (k_out, k_in).

    Arguments (and acts, grads, bias, token_mask, backend, out_dtype, path: the module doc):
        p_in   (k_in, d_in + bias) float, on acts' device, e.g.
               ``gaussian_matrix(d_in + bias, k_in, seed=..., device=acts.device)``
        p_out  (k_out, d_out) float, on acts' device
    Returns:
        (B, k_out * k_in) out_dtype (default float32)
    """
    acts, grads, mask, dtype = _prepare(acts, grads, token_mask, out_dtype)
    resolve("logra", acts.device, backend)  # backend checks, whichever path runs
    d_in = acts.shape[2] + int(bias)
    for name, p, width in (("p_in", p_in, d_in), ("p_out", p_out, grads.shape[2])):
        _checks.floating(name, p)
        _checks.ndim(name, p, (2,), "(k, d)")
        _checks.same_device(name, p, "acts", acts)
        if p.shape[1] != width:
            hint = " (bias=True adds one input column)" if name == "p_in" and bias else ""
            raise ValueError(f"{name} must have {width} columns{hint}; got shape {tuple(p.shape)}")
    p_in, p_out = p_in.float().contiguous(), p_out.float().contiguous()
    if _materialized_path(path, "logra", acts, grads, bias, p_in.shape[0], p_out.shape[0]):

        def compress(gradient):  # (n, d_out, d_in') -> (n, k_out * k_in)
            return (p_out @ gradient @ p_in.T).flatten(1)

        out = blocks(acts, grads, mask, bool(bias), compress, BLOCK_FLOATS)
    else:
        out = run("logra", backend, acts.device, acts, grads, p_in, p_out, mask, bool(bias))
    return out.to(dtype)


def fact_grass(
    acts: torch.Tensor,
    grads: torch.Tensor,
    *,
    k: int,
    in_indices: torch.Tensor,
    out_indices: torch.Tensor,
    c: int = 1,
    seed: int = 0,
    bias: bool = False,
    token_mask: torch.Tensor | None = None,
    backend: str | None = None,
    out_dtype: torch.dtype | None = None,
    path: str = "auto",
) -> torch.Tensor:
    """FactGraSS: mask both sides of G_i, then SJLT to k:

        sjlt(flatten(G_i[out_indices][:, in_indices]) * sqrt(d_out * d_in' / (k_o' * k_i')),
             k, c=c, seed=seed)

    Arguments (and acts, grads, bias, token_mask, backend, out_dtype, path: the module doc):
        k            int > 0, output size, divisible by c
        in_indices   (k_i',) int64 / int32, distinct, in [0, d_in + bias), on acts' device
        out_indices  (k_o',) int64 / int32, distinct, in [0, d_out), on acts' device
        c            int, 1 <= c <= k, buckets per coordinate
        seed         int, the seed of the SJLT table (k_o' * k_i', c)
    Returns:
        (B, k) out_dtype (default float32)
    """
    acts, grads, mask, dtype = _prepare(acts, grads, token_mask, out_dtype)
    resolve("fact_grass", acts.device, backend)  # backend checks, whichever path runs
    d_in, d_out = acts.shape[2] + int(bias), grads.shape[2]
    idx_in = _checks.indices("in_indices", in_indices, d_in, "acts", acts)
    idx_out = _checks.indices("out_indices", out_indices, d_out, "acts", acts)
    reduced = idx_in.numel() * idx_out.numel()
    codes = _tables.sjlt_codes(reduced, k, c=c, seed=seed, device=acts.device)
    scale = math.sqrt(d_out * d_in / reduced)
    k_i, k_o = idx_in.numel(), idx_out.numel()
    if _materialized_path(path, "fact_grass", acts, grads, bias, k_i, k_o, c):
        # The kept entries of vec(G_i), in the order of flatten(G_i[out_indices][:, in_indices]).
        flat_idx = (idx_out.unsqueeze(1) * d_in + idx_in).flatten()

        def compress(gradient):  # (n, d_out, d_in') -> (n, k)
            x = gradient.flatten(1)
            return run("grass", backend, acts.device, x, flat_idx, codes, k, scale)

        out = blocks(acts, grads, mask, bool(bias), compress, BLOCK_FLOATS)
    else:
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
    path: str = "auto",
) -> torch.Tensor:
    """FactSJLT, a Kronecker SJLT: flatten(sjlt(Delta, k_out)^T sjlt(X, k_in)) per example,
    row-major over (k_out, k_in). Reads every coordinate (no mask bias). The materialised path
    sketches G_i with the flat ``sjlt`` of the same backend (rows with the input table, then
    columns with the output table).

    Arguments (and acts, grads, bias, token_mask, backend, out_dtype, path: the module doc):
        k_in      int > 0, input-side sketch size, divisible by c
        k_out     int > 0, output-side sketch size, divisible by c
        c         int, 1 <= c <= min(k_in, k_out), buckets per coordinate on each side
        seed_in   int, the seed of the input-side table (d_in + bias, c)
        seed_out  int, the seed of the output-side table (d_out, c)
    Returns:
        (B, k_out * k_in) out_dtype (default float32)
    """
    acts, grads, mask, dtype = _prepare(acts, grads, token_mask, out_dtype)
    resolve("fact_sjlt", acts.device, backend)  # backend checks, whichever path runs
    d_in, d_out = acts.shape[2] + int(bias), grads.shape[2]
    codes_in = _tables.sjlt_codes(d_in, k_in, c=c, seed=seed_in, device=acts.device)
    codes_out = _tables.sjlt_codes(d_out, k_out, c=c, seed=seed_out, device=acts.device)
    if _materialized_path(path, "fact_sjlt", acts, grads, bias, k_in, k_out, c):

        def compress(gradient):  # (n, d_out, d_in') -> (n, k_out * k_in)
            n = gradient.shape[0]
            rows = run("sjlt", backend, acts.device, gradient.flatten(0, 1), codes_in, k_in)
            cols = rows.view(n, d_out, k_in).transpose(1, 2).reshape(n * k_in, d_out)
            both = run("sjlt", backend, acts.device, cols, codes_out, k_out)
            return both.view(n, k_in, k_out).transpose(1, 2).flatten(1)

        out = blocks(acts, grads, mask, bool(bias), compress, BLOCK_FLOATS)
    else:
        out = run(
            "fact_sjlt", backend, acts.device,
            acts, grads, codes_in, codes_out, k_in, k_out, mask, bool(bias),
        )
    return out.to(dtype)
