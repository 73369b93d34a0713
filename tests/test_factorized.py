"""Factorized ops (logra, fact_grass, fact_sjlt) against their contract:

    factorized(X, Delta) == flat map applied to vec(G_i),  G_i = sum_t delta_t x_t^T

checked on every backend, shape and dtype by the sweep (test_sweep.py; ``sweep.contract`` is
its oracle). Here: what the sweep does not vary (masked tokens holding NaN, strided inputs,
out_dtype, the materialise path and its choice, seeds, more than 2**31 elements), the oracle's
G_i against torch.func per-example gradients of a real network, and bad input.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, require_free_memory
from sweep import FP32_RTOL, UNIT_ROUNDOFF, contract, layer_inputs, per_example_gradient

import grass_kernels as gk
from grass_kernels import _tables
from grass_kernels.factorized import _materialized_path

OPS = ("logra", "fact_grass", "fact_sjlt")


def test_fact_grass_masked_tokens_never_read():
    """Masked tokens may hold non-finite values (padding): they must not reach the output,
    in either gather order."""
    for shape in ("panels-dense", "panels-sparse"):
        acts, grads, mask = layer_inputs(2, 9, 1500 if shape == "panels-sparse" else 70, 20,
                                         mask="bool")
        dirty = acts.clone()
        dirty[~mask] = float("nan")
        clean, _ = contract("fact_grass", shape, acts, grads, mask, True)
        out, _ = contract("fact_grass", shape, dirty, grads, mask, True)
        assert torch.isfinite(out).all() and torch.equal(out, clean)


def test_strided_inputs():
    """Non-contiguous acts and grads (stride 2 inner dim, transposed) on the CPU kernel."""
    acts = torch.randn(3, 10, 2 * 23)[:, :, ::2]
    grads = torch.randn(3, 19, 10).transpose(1, 2)
    for op in OPS:
        out, expected = contract(op, "tokens-odd", acts, grads, None, True)
        assert rel_err(out, expected) < FP32_RTOL


def test_out_dtype():
    acts, grads, _ = layer_inputs(3, 17, 70, 45)
    out, expected = contract("fact_grass", "tokens-odd", acts, grads, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    # Each output is rounded once to bf16: relative error at most its unit roundoff.
    assert rel_err(out, expected) < UNIT_ROUNDOFF[torch.bfloat16]
    assert rel_err(out, expected) > FP32_RTOL  # and it was rounded


@pytest.mark.parametrize("op", ["logra", "fact_grass", "fact_sjlt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paths_agree(op, dtype):
    """The fused path and the materialise-then-compress path give the same output."""
    acts, grads, mask = layer_inputs(7, 13, 21, 10, dtype, mask="float")
    fused, expected = contract(op, "tokens-odd", acts, grads, mask, True, path="factorized")
    materialized, _ = contract(op, "tokens-odd", acts, grads, mask, True, path="materialize")
    assert rel_err(materialized, fused) < 1e-5
    assert rel_err(materialized, expected) < FP32_RTOL


def test_path_rule():
    """The FLOP rule materialises long sequences through small layers, and only those."""
    def choice(op, t, d):
        acts, grads = torch.empty(1, t, d), torch.empty(1, t, d)
        return _materialized_path("auto", op, acts, grads, False, 64, 64)

    for op in ("logra", "fact_sjlt"):
        assert choice(op, t=4096, d=16)
        assert not choice(op, t=256, d=4096)
    assert not choice("fact_sjlt", t=4096, d=256)
    # fact_grass's fused kernel forms only the masked k_o' x k_i' gradient (k' <= d): never
    # more work than G_i, down to masks that keep every coordinate.
    for t, d, kept in ((1, 16, 16), (4096, 16, 16), (4096, 16, 4), (256, 4096, 64)):
        acts = torch.empty(1, t, d)
        assert not _materialized_path("auto", "fact_grass", acts, acts, False, kept, kept)


def test_path_materialize_chunks(monkeypatch):
    """The materialised path forms G_i for bounded blocks of examples, and blocks agree."""
    import grass_kernels.factorized as fz

    acts, grads, mask = layer_inputs(5, 4, 6, 3, mask="bool")
    whole, _ = contract("fact_sjlt", "tokens-odd", acts, grads, mask, True, path="materialize")
    monkeypatch.setattr(fz, "BLOCK_FLOATS", 1)  # one example per block
    chunked, expected = contract("fact_sjlt", "tokens-odd", acts, grads, mask, True,
                                 path="materialize")
    assert torch.equal(whole, chunked)
    assert rel_err(chunked, expected) < FP32_RTOL


def test_deterministic_and_seeded():
    """Same inputs and seed: bit-identical output (also when one example is split over
    threads); another seed: a different map."""
    acts, grads, mask = layer_inputs(1, 301, 40, 30, mask="bool")
    run = lambda seed: gk.fact_sjlt(acts, grads, k_in=8, k_out=8, seed_in=seed, token_mask=mask)
    assert torch.equal(run(0), run(0))
    assert rel_err(run(1), run(0)) > 0.1
    idx_in, idx_out = gk.random_indices(40, 9, seed=1), gk.random_indices(30, 7, seed=2)
    grass = lambda seed: gk.fact_grass(
        acts, grads, k=64, in_indices=idx_in, out_indices=idx_out, seed=seed, token_mask=mask
    )
    assert torch.equal(grass(0), grass(0))
    assert rel_err(grass(1), grass(0)) > 0.1


def test_cached_tables_equal_fresh_draws(device):
    """The tables served (cached, copied to the device) equal ones drawn afresh from the same
    seeds under another global RNG state: one map for every device, call and process."""
    torch.manual_seed(12345)
    torch.randn(1000)
    codes = gk.sjlt_codes(77, 16, c=2, seed=9, device=device).cpu()
    matrix = gk.gaussian_matrix(33, 5, seed=2, device=device).cpu()
    assert torch.equal(codes, _tables._sjlt_codes_cpu.__wrapped__(77, 16, 2, 9))
    assert torch.equal(matrix, _tables._gaussian_matrix_cpu.__wrapped__(33, 5, 2))
    # Another seed gives another table (the comparison is not of something constant).
    assert not torch.equal(_tables._sjlt_codes_cpu.__wrapped__(77, 16, 2, 10), codes)
    assert not torch.equal(_tables._gaussian_matrix_cpu.__wrapped__(33, 5, 3), matrix)


@pytest.mark.slow
def test_more_than_2_31_elements():
    """acts (B, T, d_in) with B * T * d_in > 2**31 (bf16, 4.3 GB): the examples past the 32-bit
    boundary, checked against the reference on just those examples, for all three ops. The
    bulk holds one repeated random example, the checked ones fresh values."""
    require_free_memory(6)
    t, d_in, d_out = 64, 1031, 3
    per_example = t * d_in
    b = 2**31 // per_example + 2
    acts = torch.empty(b, t, d_in, dtype=torch.bfloat16)
    acts.copy_(torch.randn(1, t, d_in, generator=torch.Generator().manual_seed(0)).expand_as(acts))
    grads = torch.randn(b, t, d_out, generator=torch.Generator().manual_seed(1)).bfloat16()
    rows = torch.tensor([2**31 // per_example - 1, 2**31 // per_example, b - 1])
    fresh = torch.Generator().manual_seed(2)
    acts[rows] = torch.randn(len(rows), t, d_in, generator=fresh).bfloat16()
    in_idx, out_idx = gk.random_indices(d_in + 1, 20, seed=3), torch.arange(d_out)
    p_in, p_out = gk.gaussian_matrix(d_in + 1, 8, seed=4), gk.gaussian_matrix(d_out, 2)
    calls = {
        "fact_grass": lambda a, g, backend: gk.fact_grass(
            a, g, k=64, in_indices=in_idx, out_indices=out_idx, bias=True, backend=backend),
        "fact_sjlt": lambda a, g, backend: gk.fact_sjlt(
            a, g, k_in=8, k_out=2, bias=True, backend=backend, path="factorized"),
        "logra": lambda a, g, backend: gk.logra(
            a, g, p_in=p_in, p_out=p_out, bias=True, backend=backend, path="factorized"),
    }
    for name, call in calls.items():
        out = call(acts, grads, "cpu")[rows]
        assert rel_err(out, call(acts[rows], grads[rows], "reference")) < FP32_RTOL, name


def test_real_two_layer_net():
    """Against torch.func per-example gradients of a two-layer nn.Linear net whose per-example
    loss skips padding tokens; the kernels get the output gradients of the unmasked loss plus
    the token mask, so the mask (not a zero gradient) has to remove the padding."""
    torch.manual_seed(0)
    b, t, d0, h, d2 = 4, 6, 9, 11, 5
    net = torch.nn.Sequential(torch.nn.Linear(d0, h), torch.nn.Tanh(), torch.nn.Linear(h, d2))
    inputs, targets = torch.randn(b, t, d0), torch.randn(b, t, d2)
    keep = torch.rand(b, t) > 0.3
    keep[:, 0] = True
    params = {name: p.detach() for name, p in net.named_parameters()}

    def loss(p, x, y, m):  # one example: x (T, d0), y (T, d2), m (T,)
        out = torch.func.functional_call(net, p, (x,))
        return (((out - y) ** 2).sum(-1) * m).sum()

    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0, 0))(
        params, inputs, targets, keep.float()
    )

    # Layer inputs and output gradients of the unmasked summed loss (= per-example deltas).
    hidden = net[0](inputs)
    hidden.retain_grad()
    activated = net[1](hidden)
    out = net[2](activated)
    out.retain_grad()
    ((out - targets) ** 2).sum().backward()
    layers = {"0": (inputs, hidden.grad), "2": (activated.detach(), out.grad)}

    for name, (acts, grads) in layers.items():
        weight, bias = per_example[f"{name}.weight"], per_example[f"{name}.bias"]
        gradient = torch.cat([weight, bias.unsqueeze(-1)], dim=-1)  # (B, d_out, d_in + 1)
        # The sweep's oracle G_i (and linear_grads) of the masked tokens is torch.func's
        # gradient ...
        assert rel_err(per_example_gradient(acts, grads, keep, True), gradient) < 1e-5
        assert rel_err(gk.linear_grads(acts, grads, bias=True, token_mask=keep), gradient) < 1e-5
        # ... so each op, checked against that oracle, matches the real per-example gradient.
        for op in OPS:
            got, expected = contract(op, "tokens-odd", acts, grads, keep, True)
            assert rel_err(got, expected) < FP32_RTOL
        p_in = gk.gaussian_matrix(acts.shape[-1] + 1, 7, seed=11)
        p_out = gk.gaussian_matrix(grads.shape[-1], 5, seed=12)
        got = gk.logra(acts, grads, p_in=p_in, p_out=p_out, bias=True, token_mask=keep)
        assert rel_err(got, (p_out @ gradient @ p_in.T).flatten(1)) < FP32_RTOL


# ---------------------------------------------------------------------------- bad input

def _good():
    acts, grads = torch.randn(2, 3, 8), torch.randn(2, 3, 5)
    return acts, grads, gk.random_indices(8, 4), gk.random_indices(5, 2)


def _grass_call(acts=None, grads=None, in_indices=None, out_indices=None, **kw):
    a, g, i, o = _good()
    return gk.fact_grass(
        a if acts is None else acts, g if grads is None else grads, k=16,
        in_indices=i if in_indices is None else in_indices,
        out_indices=o if out_indices is None else out_indices, **kw,
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"grads": torch.randn(3, 3, 5)}, r"agree on \(B, T\)"),
        ({"grads": torch.randn(2, 4, 5)}, r"agree on \(B, T\)"),
        ({"in_indices": torch.tensor([0, 8])}, r"in_indices must lie in \[0, 8\)"),
        ({"in_indices": torch.tensor([1, 1, 2])}, "in_indices has duplicate"),
        ({"out_indices": torch.arange(6)}, "out_indices has 6 entries .* only 5"),
        ({"token_mask": torch.ones(2, 4)}, r"token_mask must have shape \(B, T\) = \(2, 3\)"),
        ({"c": 3}, "k must be divisible by c"),
    ],
)
def test_bad_input_fact_grass(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _grass_call(**kwargs)


def test_bad_input_types():
    with pytest.raises(TypeError, match="acts must be float32"):
        _grass_call(acts=torch.ones(2, 3, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="in_indices must be int64 or int32"):
        _grass_call(in_indices=torch.tensor([0.0, 1.0]))


def test_bad_input_logra():
    acts, grads, _, _ = _good()
    p_in, p_out = torch.randn(4, 8), torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"p_in must have 9 columns \(bias=True adds one"):
        gk.logra(acts, grads, p_in=p_in, p_out=p_out, bias=True)
    with pytest.raises(ValueError, match="p_out must have 5 columns"):
        gk.logra(acts, grads, p_in=p_in, p_out=torch.randn(3, 6))
    with pytest.raises(ValueError, match="path must be one of"):
        gk.logra(acts, grads, p_in=p_in, p_out=p_out, path="fast")


def test_bad_input_fact_sjlt():
    acts, grads, _, _ = _good()
    with pytest.raises(ValueError, match="c .* must be at most k"):
        gk.fact_sjlt(acts, grads, k_in=2, k_out=8, c=4)
    with pytest.raises(ValueError, match="acts and grads must both be 2-D or both 3-D"):
        gk.fact_sjlt(acts, grads[:, 0], k_in=4, k_out=4)


def test_native_op_rejects_out_of_range_tables():
    """Called directly (no Python checks), the kernel refuses tables that do not fit."""
    acts, grads, idx_in, idx_out = _good()
    codes = gk.sjlt_codes(8, 16, c=1, seed=0)
    ops = torch.ops.grass_kernels
    with pytest.raises(ValueError, match="in_indices must lie in"):
        ops.fact_grass(acts, grads, torch.tensor([0, 9]), idx_out, codes[:4], 16, 1.0, None, True)
    with pytest.raises(ValueError, match=r"codes must hold buckets in \[0, k = 8\)"):
        ops.fact_grass(acts, grads, idx_in, idx_out, codes, 8, 1.0, None, False)
    with pytest.raises(ValueError, match=r"codes_in must have shape \(9, c\)"):
        ops.fact_sjlt(acts, grads, codes, gk.sjlt_codes(5, 4, c=1, seed=0), 16, 4, None, True)



@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("batch, tokens", [(0, 5), (3, 0)])
def test_empty_batch_or_no_tokens_refused(op, batch, tokens):
    """No examples or no tokens: the same ValueError from the public op and from the native
    kernel called directly (which used to divide by the batch size)."""
    acts, grads = torch.randn(batch, tokens, 23), torch.randn(batch, tokens, 19)
    codes = _tables.sjlt_codes(23, 8, seed=0)
    indices = torch.arange(4)
    native = {"logra": lambda: torch.ops.grass_kernels.logra(
                  acts, grads, torch.randn(4, 23), torch.randn(4, 19), None, False),
              "fact_grass": lambda: torch.ops.grass_kernels.fact_grass(
                  acts, grads, indices, indices, _tables.sjlt_codes(16, 8, seed=0), 8, 1.0,
                  None, False),
              "fact_sjlt": lambda: torch.ops.grass_kernels.fact_sjlt(
                  acts, grads, codes, _tables.sjlt_codes(19, 8, seed=1), 8, 8, None, False)}
    for call in (lambda: contract(op, "tokens-odd", acts, grads, None, False), native[op]):
        with pytest.raises(ValueError, match=r"B >= 1 and T >= 1"):
            call()
