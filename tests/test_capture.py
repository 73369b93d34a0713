"""Capture: per-example gradients from the custom autograd path equal torch.func's, the weight
GEMM is skipped, token masks are honoured, and the model is left exactly as it was found."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import grass
from grass.capture import Capture, layer_shape, select_layers
from grass.compressors import LayerMap
from grass.layers import TrackedLayers

from conftest import rel_err


def _modules(attr: grass.Attributor) -> dict[str, nn.Module]:
    """The captured modules by name, in column order."""
    return {name: layer.module for name, layer in attr.layers.items()}


def _flat_grads(grads: dict, layers: dict[str, nn.Module]) -> torch.Tensor:
    """torch.func per-example grads in grass's feature layout: per layer vec([W | b]) with W
    as (d_out, d_in) (Conv1D weights transposed)."""
    parts = []
    for name, module in layers.items():
        w = grads[f"{name}.weight"]
        if type(module).__name__ == "Conv1D":
            w = w.transpose(1, 2)
        if module.bias is not None:
            w = torch.cat([w, grads[f"{name}.bias"].unsqueeze(-1)], dim=-1)
        parts.append(w.flatten(1))
    return torch.cat(parts, dim=1)


def _per_example(model, loss_of_one, *batch):
    """torch.func per-example gradients of ``loss_of_one(model_fn, *example)``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, *example):
        return loss_of_one(lambda *a, **kw: functional_call(model, p, a, kw), *example)

    return vmap(grad(one), in_dims=(None,) + (0,) * len(batch))(params, *batch)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3, bias=False), nn.Tanh(),
                         nn.Linear(3, 4))


def test_identity_equals_torch_func_mlp_mean_loss():
    model = _mlp()
    x, y = torch.randn(13, 7), torch.randn(13, 4)

    def loss_fn(m, batch):  # a mean-reduced loss per example (over outputs)
        return F.mse_loss(m(batch[0]), batch[1], reduction="none").mean(1)

    attr = grass.Attributor(model, loss_fn, grass.Identity(), batch_size=5, progress=False)
    got = attr.features((x, y)).values
    ref = _per_example(
        model, lambda f, xi, yi: F.mse_loss(f(xi[None]), yi[None]), x, y
    )
    assert rel_err(got, _flat_grads(ref, _modules(attr))) < 1e-5


class _TokenModel(nn.Module):
    """(B, T, d) -> (B, T, o), token-wise, then a causal running mean (tokens interact)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x, mask):
        h = torch.tanh(self.inp(x)) * mask.unsqueeze(-1)
        h = h.cumsum(1) / torch.arange(1, x.shape[1] + 1).view(1, -1, 1)
        return self.out(h)


def _token_batch(b=5, t=9):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, t, 6, generator=g)
    lengths = torch.tensor([9, 1, 4, 7, 2])[:b]
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    target = torch.randn(b, t, 3, generator=g)
    return {"x": x, "attention_mask": mask, "target": target}


def _masked_token_loss(out, target, mask):
    per_token = ((out - target) ** 2).mean(-1)
    return (per_token * mask).sum(-1) / mask.sum(-1)


def test_identity_equals_torch_func_3d_with_padding_mask():
    model, batch = _TokenModel(), _token_batch()

    def loss_fn(m, b):
        return _masked_token_loss(m(b["x"], b["attention_mask"]), b["target"],
                                  b["attention_mask"])

    attr = grass.Attributor(model, loss_fn, grass.Identity(), batch_size=3, progress=False)
    got = attr.features(batch).values

    def one(f, x, mask, target):
        return _masked_token_loss(f(x[None], mask[None]), target[None], mask[None])[0]

    ref = _per_example(model, one, batch["x"], batch["attention_mask"], batch["target"])
    assert rel_err(got, _flat_grads(ref, _modules(attr))) < 1e-5


def test_token_mask_drops_padded_tokens():
    # The loss counts every token, but the batch says the tail is padding: the captured
    # gradients must be those of the real tokens only.
    model, batch = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), _token_batch()
    mask = batch["attention_mask"]

    def loss_fn(m, b):
        return ((m(b["x"]) - b["target"]) ** 2).sum((1, 2))

    attr = grass.Attributor(model, loss_fn, grass.Identity(), batch_size=5, progress=False)
    got = attr.features(batch).values

    def one(f, x, m, target):
        return (((f(x) - target) ** 2).sum(-1) * m).sum()

    ref = _per_example(model, one, batch["x"], mask, batch["target"])
    assert rel_err(got, _flat_grads(ref, _modules(attr))) < 1e-5
    unmasked = attr.features({k: v for k, v in batch.items() if k != "attention_mask"}).values
    assert rel_err(unmasked, got) > 1e-2  # the mask did something


@pytest.fixture(scope="module")
def gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=37, n_positions=12, bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def _lm_batch(b=3, t=7):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 37, (b, t), generator=g)
    lengths = torch.tensor([7, 3, 5])[:b]
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}


def _lm_loss(logits, ids, mask):
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    m = mask[:, 1:].float()
    return (losses * m).sum(1) / m.sum(1)


def test_identity_equals_torch_func_gpt2_conv1d(gpt2):
    batch = _lm_batch()

    def loss_fn(m, b):
        return _lm_loss(m(**b).logits, b["input_ids"], b["attention_mask"])

    # lm_head shares its weight with the embedding, whose torch.func gradient mixes both uses.
    attr = grass.Attributor(gpt2, loss_fn, grass.Identity(), layers="transformer.*",
                            batch_size=2, progress=False)
    assert len(attr.layers) == 8 and all(
        type(t.module).__name__ == "Conv1D" for t in attr.layers.values()
    )
    got = attr.features(batch).values
    refs = []
    for i in range(batch["input_ids"].shape[0]):  # one example at a time: no batch effects
        ids, mask = batch["input_ids"][i:i + 1], batch["attention_mask"][i:i + 1]
        params = {k: v.detach() for k, v in gpt2.named_parameters()}
        g = grad(lambda p: _lm_loss(
            functional_call(gpt2, p, (), {"input_ids": ids, "attention_mask": mask}).logits,
            ids, mask)[0])(params)
        refs.append(_flat_grads({k: v.unsqueeze(0) for k, v in g.items()}, _modules(attr)))
    assert rel_err(got, torch.cat(refs)) < 1e-4


def test_default_layers_are_every_linear_and_conv1d(gpt2):
    names = list(select_layers(gpt2))
    assert names[-1] == "lm_head" and len(names) == 9
    with pytest.raises(ValueError, match="matches no linear layer"):
        select_layers(gpt2, "transformer.nothing.*")
    with pytest.raises(ValueError, match="matches no linear layer"):
        select_layers(gpt2, "transformer.ln_f")  # a LayerNorm: not a linear layer
    assert list(select_layers(gpt2, [nn.Linear])) == ["lm_head"]


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
                                   torch.ops.aten.matmul):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_backward_skips_weight_gradient_gemm():
    # Three linear layers: training runs 3 weight-gradient GEMMs and 2 input-gradient GEMMs
    # (the first layer's input needs none). Capture must run only the 2.
    model = _mlp()
    seen = []
    layers = TrackedLayers(
        (m, layer_shape(n, m),
         LayerMap(1, lambda a, g, mask: (seen.append(a.shape), a.new_zeros(a.shape[0], 1))[1]))
        for n, m in select_layers(model).items())
    x = torch.randn(4, 7)
    with Capture(model, layers) as capture:
        losses = None

        def loss_fn(m, batch):
            nonlocal losses
            losses = m(batch).sum(1)
            return losses

        counter = _CountMatmuls()
        with counter:
            capture.features(x, loss_fn)
    forward = 3  # one addmm / mm per layer
    assert counter.count == forward + 2
    assert len(seen) == 3
    assert all(p.grad is None for p in model.parameters())


def _snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()],
        [(n, m.training, sorted(m.__dict__), len(m._forward_hooks), len(m._forward_pre_hooks),
          len(m._backward_hooks)) for n, m in model.named_modules()],
    )


def _assert_same(model, snap):
    state, params, modules = _snapshot(model)
    assert all(torch.equal(state[k], snap[0][k]) for k in state)
    assert params == snap[1]
    assert modules == snap[2]


def _raise(grad):
    raise KeyError("boom in backward")


@pytest.mark.parametrize("where", ["none", "loss_fn", "backward", "non-finite"])
def test_model_left_unchanged(where):
    model = _mlp()
    model.train()
    model[0].weight.requires_grad_(False)  # a mixed state must come back as it was
    model[2].register_forward_hook(lambda *a: None)
    snap = _snapshot(model)
    x = torch.randn(6, 7)
    if where == "non-finite":
        x[4, 2] = float("inf")

    def loss_fn(m, batch):
        out = m(batch)
        if where == "loss_fn":
            raise KeyError("boom in loss_fn")
        if where == "backward":
            out.register_hook(_raise)
        return out.pow(2).sum(1)

    attr = grass.Attributor(model, loss_fn, grass.Identity(), batch_size=6, progress=False)
    if where == "none":
        attr.cache(x)
    else:
        with pytest.raises((KeyError, ValueError)):
            attr.cache(x)
    _assert_same(model, snap)


def test_non_finite_gradient_names_layer_and_example():
    model = _mlp()
    x = torch.randn(10, 7)
    x[7, 1] = float("nan")
    attr = grass.Attributor(model, lambda m, b: m(b).sum(1), grass.Identity(), batch_size=4,
                            progress=False)
    with pytest.raises(ValueError, match=r"non-finite gradient in layer '0' for example 7"):
        attr.cache(x)


def test_scalar_loss_is_refused():
    model = _mlp()
    attr = grass.Attributor(model, lambda m, b: m(b).sum(), grass.Identity(), progress=False)
    with pytest.raises(ValueError, match=r"per-example losses of shape \(B,\) = \(4,\)"):
        attr.cache(torch.randn(4, 7))


def test_layer_called_twice_accumulates():
    # One layer applied at two places of the forward: its gradient is the sum of both uses.
    torch.manual_seed(1)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    x = torch.randn(5, 4)
    attr = grass.Attributor(model, lambda m, b: m(b).pow(2).sum(1), grass.Identity(),
                            progress=False)
    got = attr.features(x).values
    ref = _per_example(model, lambda f, xi: f(xi).pow(2).sum(), x)
    assert rel_err(got, _flat_grads(ref, {"0": lin})) < 1e-5
