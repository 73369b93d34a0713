"""Pure-torch reference implementations: the specification and the test oracle.

Each function has exactly the signature of the registered op of the same name
(``torch.ops.grass_kernels.<name>``), takes already-checked arguments and materialised tables,
and computes in fp32. They favour plainness over speed; benchmarks name the torch baseline
they compare against.

Conventions (shapes):
    x        (N, D)        any float dtype
    codes    (D, c) int32  SJLT table, see ``_tables``
    acts     (B, T, d_in)  grads (B, T, d_out)
    G_i      = sum_t delta_t x_t^T, (d_out, d_in'), flattened row-major; d_in' = d_in + bias
             (formed by ``grass_kernels.linear_grads``, a torch op with no kernels)
"""

from __future__ import annotations

import math

import torch

from ._tables import decode_codes


def sjlt(x: torch.Tensor, codes: torch.Tensor, k: int) -> torch.Tensor:
    """y[n, h_j(i)] += s_j(i) x[n, i] / sqrt(c): (N, D) -> (N, k) fp32."""
    n, d = x.shape
    c = codes.shape[1]
    buckets, signs = decode_codes(codes)
    values = x.float().unsqueeze(-1) * (signs / math.sqrt(c))  # (N, D, c)
    out = torch.zeros(n, k, dtype=torch.float32, device=x.device)
    return out.index_add_(1, buckets.reshape(-1), values.reshape(n, d * c))


def sjlt_transpose(y: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The adjoint of ``sjlt``: x[n, i] = sum_j s_j(i) y[n, h_j(i)] / sqrt(c), (N, k) -> (N, D)."""
    c = codes.shape[1]
    buckets, signs = decode_codes(codes)
    return (y.float()[:, buckets] * signs).sum(-1) / math.sqrt(c)


def grass(
    x: torch.Tensor, indices: torch.Tensor, codes: torch.Tensor, k: int, scale: float
) -> torch.Tensor:
    """SJLT of the masked, rescaled input: sjlt(x[:, indices] * scale), codes (k', c)."""
    return sjlt(x[:, indices].float() * scale, codes, k)


def linear_inputs(
    acts: torch.Tensor, token_mask: torch.Tensor | None, bias: bool
) -> torch.Tensor:
    """fp32 (B, T, d_in') layer inputs with the bias column appended and masked tokens zeroed."""
    x = acts.float()
    if bias:
        x = torch.cat([x, x.new_ones(*x.shape[:2], 1)], dim=-1)
    if token_mask is not None:
        x = x * token_mask.to(x.dtype).unsqueeze(-1)
    return x


def logra(
    acts: torch.Tensor,
    grads: torch.Tensor,
    p_in: torch.Tensor,
    p_out: torch.Tensor,
    token_mask: torch.Tensor | None,
    bias: bool,
) -> torch.Tensor:
    """flatten(P_out G_i P_in^T): p_in (k_in, d_in'), p_out (k_out, d_out) -> (B, k_out * k_in)."""
    x = linear_inputs(acts, token_mask, bias) @ p_in.float().T  # (B, T, k_in)
    g = grads.float() @ p_out.float().T  # (B, T, k_out)
    return torch.einsum("bto,bti->boi", g, x).reshape(acts.shape[0], -1)


def fact_grass(
    acts: torch.Tensor,
    grads: torch.Tensor,
    in_indices: torch.Tensor,
    out_indices: torch.Tensor,
    codes: torch.Tensor,
    k: int,
    scale: float,
    token_mask: torch.Tensor | None,
    bias: bool,
) -> torch.Tensor:
    """sjlt(flatten(G_i[out_indices][:, in_indices]) * scale), codes (k_o' * k_i', c) -> (B, k)."""
    x = linear_inputs(acts, token_mask, bias)[..., in_indices]
    g = grads.float()[..., out_indices]
    reduced = torch.einsum("bto,bti->boi", g, x).reshape(acts.shape[0], -1)
    return sjlt(reduced * scale, codes, k)


def fact_sjlt(
    acts: torch.Tensor,
    grads: torch.Tensor,
    codes_in: torch.Tensor,
    codes_out: torch.Tensor,
    k_in: int,
    k_out: int,
    token_mask: torch.Tensor | None,
    bias: bool,
) -> torch.Tensor:
    """flatten(sjlt(Delta)^T sjlt(X)) per example: codes_in (d_in', c), codes_out (d_out, c)."""
    b, t = acts.shape[:2]
    x = linear_inputs(acts, token_mask, bias)
    xs = sjlt(x.reshape(b * t, -1), codes_in, k_in).reshape(b, t, k_in)
    gs = sjlt(grads.reshape(b * t, -1), codes_out, k_out).reshape(b, t, k_out)
    return torch.einsum("bto,bti->boi", gs, xs).reshape(b, -1)
