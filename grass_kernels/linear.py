"""The per-example weight gradient of a linear layer, G_i = sum_t delta_t x_t^T, formed whole or
a block of examples at a time under a memory budget.

Layout: G_i is (d_out, d_in') with d_in' = d_in + bias; the bias column, when asked for, is the
last one (index d_in) and holds sum_t delta_t, the gradient of the bias. Flattened row-major,
vec(G_i) is the vector the flat compressors act on. The token mask scales delta_t (the cheaper
side): a masked token contributes nothing. Formed in fp32 with one batched GEMM per block.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import _checks

# A block of examples holds at most this many fp32 values by default (64 MB): its gradients
# n * d_out * d_in' plus the fp32 copies of its inputs n * T * (d_in + d_out).
BLOCK_FLOATS = 1 << 24


def _block_rows(tokens: int, d_in: int, d_out: int, bias: bool, block_floats: int) -> int:
    """Examples per block: as many as fit in ``block_floats`` fp32 values, at least one."""
    per_example = tokens * (d_in + d_out) + d_out * (d_in + int(bias))
    return max(1, block_floats // per_example)


def _form(acts, grads, mask, bias: bool, out: torch.Tensor) -> torch.Tensor:
    """G_i of a block into ``out`` (n, d_out, d_in') fp32: acts (n, T, d_in), grads (n, T, d_out),
    mask (n, T) fp32 or None."""
    delta = grads.float()
    if mask is not None:
        delta = delta * mask.unsqueeze(-1)
    d_in = acts.shape[2]
    torch.bmm(delta.transpose(1, 2), acts.float(), out=out[:, :, :d_in])
    if bias:
        out[:, :, d_in] = delta.sum(1)
    return out


def _scratch(workspace, floats: int, device: torch.device) -> torch.Tensor:
    """A flat fp32 buffer of ``floats`` values: ``workspace``, grown in place when too small."""
    if workspace is None:
        return torch.empty(floats, dtype=torch.float32, device=device)
    if not isinstance(workspace, torch.Tensor) or workspace.dtype != torch.float32:
        raise TypeError(
            "workspace must be a float32 torch.Tensor (e.g. torch.empty(0, device=acts.device)); "
            f"got {getattr(workspace, 'dtype', type(workspace).__name__)}"
        )
    if workspace.device != device:
        raise ValueError(f"workspace is on {workspace.device} but acts is on {device}; make it "
                         f"with torch.empty(0, device=acts.device)")
    if workspace.numel() < floats:
        workspace.resize_(floats)
    return workspace.view(-1)[:floats]


def blocks(acts, grads, mask, bias: bool, compress, block_floats: int, workspace=None):
    """compress(G) over blocks of examples, concatenated along dim 0; arguments already checked
    (acts (B, T, d_in), grads (B, T, d_out), mask (B, T) fp32 or None)."""
    b, t, d_in = acts.shape
    d_out = grads.shape[2]
    rows = min(b, _block_rows(t, d_in, d_out, bias, block_floats))
    width = d_in + int(bias)
    scratch = _scratch(workspace, rows * d_out * width, acts.device).view(rows, d_out, width)
    parts = []
    for lo in range(0, b, rows):
        hi = min(b, lo + rows)
        block_mask = None if mask is None else mask[lo:hi]
        block = _form(acts[lo:hi], grads[lo:hi], block_mask, bias, scratch[: hi - lo])
        parts.append(compress(block))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def linear_grads(
    acts: torch.Tensor,
    grads: torch.Tensor,
    *,
    bias: bool = False,
    token_mask: torch.Tensor | None = None,
    compress: Callable[[torch.Tensor], torch.Tensor] | None = None,
    block_floats: int = BLOCK_FLOATS,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example weight gradients G_i = sum_t delta_t x_t^T of a linear layer y = W x (+ b).

    Without ``compress``: every G_i at once. With it: G is formed a block of examples at a time
    (at most ``block_floats`` fp32 values for a block, at least one example), ``compress`` maps
    each block, and the results are concatenated along dim 0. The block is scratch memory that
    the next block overwrites: ``compress`` must return new memory, never the block or a view.

    Arguments:
        acts          (B, T, d_in) or (B, d_in) float32 / bfloat16 / float16, layer inputs x_t
        grads         (B, T, d_out) or (B, d_out) float, output gradients delta_t, same B, T
        bias          append the bias column sum_t delta_t at index d_in (d_in' = d_in + 1)
        token_mask    optional (B, T) bool or float, scales delta_t: masked tokens contribute
                      nothing (their values must be finite)
        compress      optional callable, (n, d_out, d_in') float32 -> (n, ...) tensor
        block_floats  int > 0, fp32 values one block may hold (gradients + fp32 inputs)
        workspace     optional float32 tensor on acts' device holding the blocks, grown in place
                      when too small: pass the same one on every call to allocate once
                      (only with ``compress``)
    Returns:
        (B, d_out, d_in') float32 without ``compress``; with it, the concatenated outputs
    """
    acts, grads = _checks.acts_and_grads(acts, grads)
    mask = _checks.token_mask(token_mask, acts.shape[0], acts.shape[1], acts)
    block_floats = _checks.positive_int("block_floats", block_floats)
    if compress is None:
        if workspace is not None:
            raise ValueError(
                "workspace holds the blocks given to compress; without compress the result is "
                "new memory: pass compress=..., or leave workspace out"
            )
        b, d_out, width = acts.shape[0], grads.shape[2], acts.shape[2] + int(bias)
        out = torch.empty(b, d_out, width, dtype=torch.float32, device=acts.device)
        return _form(acts, grads, mask, bool(bias), out)
    if not callable(compress):
        raise TypeError(f"compress must be a callable or None; got {type(compress).__name__}")
    return blocks(acts, grads, mask, bool(bias), compress, block_floats, workspace)
