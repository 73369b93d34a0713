"""grass_kernels.linear_grads, the per-example weight gradient G_i = sum_t delta_t x_t^T of a
linear layer: against per-example autograd through a real nn.Linear, whole and in blocks, and
its argument checks."""

from __future__ import annotations

import pytest
import torch

import grass_kernels as gk
from conftest import DTYPES, rel_err

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]
# (B, T, d_in, d_out), T None: the 2-D (B, d) form.
SHAPES = {"odd": (3, 5, 7, 11), "one token": (4, 1, 9, 6), "2-D": (5, None, 13, 3)}


def _inputs(shape, dtype, mask_kind, seed=0):
    """acts, grads in ``dtype`` and a token mask (None, bool or float, every example keeps a
    token), fresh random values."""
    b, t, d_in, d_out = shape
    g = torch.Generator().manual_seed(seed)
    dims = (b,) if t is None else (b, t)
    acts = torch.randn(*dims, d_in, generator=g).to(dtype)
    grads = torch.randn(*dims, d_out, generator=g).to(dtype)
    if mask_kind is None:
        return acts, grads, None
    keep = torch.rand(b, 1 if t is None else t, generator=g) > 0.4
    keep[:, 0] = True
    return acts, grads, keep if mask_kind == "bool" else keep * torch.rand(keep.shape, generator=g)


def _autograd(acts, grads, mask, bias):
    """G_i from torch.autograd, one example at a time: the loss sum_t m_t <delta_t, W x_t + b>
    of a real nn.Linear has weight gradient sum_t m_t delta_t x_t^T and bias gradient
    sum_t m_t delta_t. fp32 on the inputs as given (already rounded to their dtype)."""
    acts, grads = acts.float(), grads.float()
    if acts.dim() == 2:
        acts, grads = acts.unsqueeze(1), grads.unsqueeze(1)
    layer = torch.nn.Linear(acts.shape[2], grads.shape[2], bias=bias)
    weights = torch.ones(acts.shape[:2]) if mask is None else mask.float()
    out = []
    for x, delta, m in zip(acts, grads, weights):
        loss = (layer(x) * delta * m.unsqueeze(-1)).sum()
        parts = torch.autograd.grad(loss, list(layer.parameters()))
        out.append(torch.cat([parts[0], parts[1].unsqueeze(-1)], 1) if bias else parts[0])
    return torch.stack(out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_autograd(device, shape, dtype, mask_kind, bias):
    acts, grads, mask = _inputs(SHAPES[shape], dtype, mask_kind)
    on = [None if t is None else t.to(device) for t in (acts, grads, mask)]
    out = gk.linear_grads(on[0], on[1], bias=bias, token_mask=on[2])
    assert out.device.type == device
    out = out.cpu()
    expected = _autograd(acts, grads, mask, bias)
    d_in, d_out = SHAPES[shape][2] + bias, SHAPES[shape][3]
    assert out.dtype == torch.float32 and out.shape == (SHAPES[shape][0], d_out, d_in)
    # Both accumulate the same fp32 products of the rounded inputs: fp32 rounding only.
    assert rel_err(out, expected) < 1e-6


def test_masked_tokens_contribute_nothing():
    """The mask scales delta_t: other values at masked tokens give the same G_i, bit for bit,
    and the bias column sums delta_t over the kept tokens only."""
    acts, grads, mask = _inputs((3, 6, 8, 5), torch.float32, "bool", seed=1)
    out = gk.linear_grads(acts, grads, bias=True, token_mask=mask)
    assert torch.equal(out, gk.linear_grads(acts, grads * mask.unsqueeze(-1), bias=True))
    other_acts, other_grads = acts.clone(), grads.clone()
    other_acts[~mask] = 100 * torch.randn(int((~mask).sum()), 8)
    other_grads[~mask] = 100 * torch.randn(int((~mask).sum()), 5)
    other = gk.linear_grads(other_acts, other_grads, bias=True, token_mask=mask)
    assert torch.equal(other, out)
    kept_delta = (grads * mask.unsqueeze(-1)).sum(1)
    assert torch.allclose(out[:, :, -1], kept_delta, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block_floats", [1, 300, 10**6])
def test_blocks_cover_every_example_once(block_floats):
    """With ``compress`` the examples go in blocks of at most ``block_floats`` values (at least
    one example), in order, and the concatenated outputs equal compress(whole)."""
    acts, grads, mask = _inputs((7, 3, 6, 4), torch.bfloat16, "float", seed=2)
    seen = []

    def compress(block):
        seen.append(block.shape[0])
        return block.flatten(1).sum(1, keepdim=True) * 2  # (n, 1), new memory

    out = gk.linear_grads(acts, grads, bias=True, token_mask=mask, compress=compress,
                          block_floats=block_floats)
    whole = gk.linear_grads(acts, grads, bias=True, token_mask=mask)
    assert torch.equal(out, whole.flatten(1).sum(1, keepdim=True) * 2)
    per_example = 3 * (6 + 4) + 4 * 7
    rows = max(1, block_floats // per_example)
    assert seen == [min(rows, 7 - lo) for lo in range(0, 7, rows)]


def test_workspace_is_reused_and_grown():
    """One workspace across calls: grown in place when a call needs more, then reused."""
    workspace = torch.empty(0)
    ptrs = []

    def compress(block):
        ptrs.append(block.data_ptr())
        return block.flatten(1).clone()

    small = _inputs((2, 3, 5, 4), torch.float32, None)[:2]
    large = _inputs((6, 3, 5, 4), torch.float32, None, seed=1)[:2]
    for acts, grads in (small, large, small, large):
        out = gk.linear_grads(acts, grads, compress=compress, workspace=workspace)
        assert torch.equal(out, gk.linear_grads(acts, grads).flatten(1))
    assert workspace.numel() == 6 * 4 * 5  # the large call's one block
    assert ptrs[1] == ptrs[2] == ptrs[3] == workspace.data_ptr()


def test_bad_arguments():
    acts, grads, mask = _inputs((2, 3, 5, 4), torch.float32, "bool")
    with pytest.raises(TypeError, match="acts must be float32, bfloat16 or float16"):
        gk.linear_grads(acts.double(), grads)
    with pytest.raises(TypeError, match="grads must be float32"):
        gk.linear_grads(acts, grads.long())
    with pytest.raises(ValueError, match=r"acts and grads must agree on \(B, T\)"):
        gk.linear_grads(acts, grads[:, :2])
    with pytest.raises(ValueError, match="both be 2-D or both 3-D"):
        gk.linear_grads(acts, grads[:, 0])
    with pytest.raises(ValueError, match=r"token_mask must have shape \(B, T\) = \(2, 3\)"):
        gk.linear_grads(acts, grads, token_mask=mask[:, :2])
    with pytest.raises(TypeError, match="compress must be a callable or None"):
        gk.linear_grads(acts, grads, compress="sjlt")
    with pytest.raises(ValueError, match="block_floats must be a positive int"):
        gk.linear_grads(acts, grads, compress=torch.clone, block_floats=0)
    with pytest.raises(TypeError, match="workspace must be a float32 torch.Tensor"):
        gk.linear_grads(acts, grads, compress=torch.clone, workspace=torch.empty(0).double())
    with pytest.raises(ValueError, match="workspace is on meta but acts is on cpu"):
        gk.linear_grads(acts, grads, compress=torch.clone, workspace=torch.empty(0, device="meta"))
    with pytest.raises(ValueError, match="workspace holds the blocks given to compress"):
        gk.linear_grads(acts, grads, workspace=torch.empty(0))
