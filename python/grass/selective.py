"""Selective Mask: choose which gradient coordinates to keep by optimisation.

Per layer, mask logits s give a soft mask σ(s). From a small sample of train gradients g_i and
test gradients g_j we maximise the correlation, over pairs, between the full inner products
⟨g_j, g_i⟩ and the masked ones ⟨σ⊙g_j, σ⊙g_i⟩, minus an L1 penalty on σ; the k' coordinates of
largest logit are kept. The flat variant learns one logit per coordinate of vec(G_i); the
factorized variant one per output row and one per input column (σ_o σ_iᵀ masks G_i), for
FactGraSS.

Trained masks are saved with a GradientStore (`save_masks`) and read back (`load_masks`) into
`SelectiveMask(k, indices=...)` or `FactGraSS(k, masks=...)`: the masks enter the compressor's
config, so a store cached with one mask refuses features made with another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .attributor import Attributor
from .compressors import Identity, mask_sides
from .store import GradientStore

__all__ = ["load_masks", "save_masks", "train_factorized_mask", "train_flat_mask", "train_masks"]


def _pairwise_corr(full: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two (m, n) matrices of inner products, per test row, averaged."""
    a = full - full.mean(dim=1, keepdim=True)
    b = masked - masked.mean(dim=1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)).mean()


def _optimise(logits: list[torch.Tensor], masked_products: Callable[[list[torch.Tensor]], torch.Tensor],
              full: torch.Tensor, *, steps: int, lr: float, l1: float) -> None:
    """Adam on the logits: maximise corr(full, masked_products(σ(logits))) - l1 · mean σ."""
    opt = torch.optim.Adam(logits, lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        masks = [torch.sigmoid(s) for s in logits]
        penalty = sum(m.mean() for m in masks) / len(masks)
        loss = -_pairwise_corr(full, masked_products(masks)) + l1 * penalty
        loss.backward()
        opt.step()


def _logits(size: int, gen: torch.Generator) -> torch.Tensor:
    """Near-zero random logits. Why not zeros: a uniform mask already has correlation 1, where
    the objective's gradient vanishes and every coordinate would move alike; a little noise
    lets the informative coordinates separate from the rest."""
    return (0.01 * torch.randn(size, generator=gen)).requires_grad_()


def _top(logits: torch.Tensor, k: int) -> torch.Tensor:
    return logits.detach().topk(k).indices.sort().values


def _check_sample(name: str, g: torch.Tensor, dims: int) -> None:
    if not isinstance(g, torch.Tensor) or g.dim() != dims or g.shape[0] < 2:
        raise ValueError(f"{name} must be a {dims}-D tensor with at least 2 rows, got "
                         f"{tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__}")


def train_flat_mask(train: torch.Tensor, test: torch.Tensor, k: int, *, steps: int = 200,
                    lr: float = 0.2, l1: float = 0.3, seed: int = 0) -> torch.Tensor:
    """The k coordinates to keep: sorted int64 (k,) indices into [0, D).

    train: (n, D) and test: (m, D) per-example gradients of one layer (a small sample).
    """
    _check_sample("train", train, 2)
    _check_sample("test", test, 2)
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"test must have D={train.shape[1]} columns like train, got {test.shape[1]}")
    if not 0 < k <= train.shape[1]:
        raise ValueError(f"k must be in [1, D={train.shape[1]}], got {k}")
    train, test = train.float(), test.float()
    logits = _logits(train.shape[1], torch.Generator().manual_seed(seed))
    _optimise([logits], lambda m: (test * m[0] ** 2) @ train.T, test @ train.T,
              steps=steps, lr=lr, l1=l1)
    return _top(logits, k)


def train_factorized_mask(train: torch.Tensor, test: torch.Tensor, *, k_in: int, k_out: int,
                          steps: int = 200, lr: float = 0.2, l1: float = 0.3, seed: int = 0
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Input columns and output rows to keep, (in_indices, out_indices) as
    `grass_kernels.fact_grass` takes them: sorted int64 (k_in,) and (k_out,).

    train: (n, d_out, d_in') and test: (m, d_out, d_in') per-example gradients of one layer.
    """
    _check_sample("train", train, 3)
    _check_sample("test", test, 3)
    d_out, d_in = train.shape[1:]
    if test.shape[1:] != train.shape[1:]:
        raise ValueError(f"test must be (m, {d_out}, {d_in}) like train, got {tuple(test.shape)}")
    if not (0 < k_out <= d_out and 0 < k_in <= d_in):
        raise ValueError(f"need 1 <= k_out <= d_out={d_out} and 1 <= k_in <= d_in={d_in}, "
                         f"got k_out={k_out}, k_in={k_in}")
    train, test = train.float(), test.float()
    gen = torch.Generator().manual_seed(seed)
    out_logits, in_logits = _logits(d_out, gen), _logits(d_in, gen)

    def masked(masks):
        weight = (masks[0][:, None] * masks[1][None, :]) ** 2  # σ_o σ_iᵀ on both sides
        return (test * weight).flatten(1) @ train.flatten(1).T

    _optimise([out_logits, in_logits], masked, test.flatten(1) @ train.flatten(1).T,
              steps=steps, lr=lr, l1=l1)
    return _top(in_logits, k_in), _top(out_logits, k_out)


def train_masks(model: torch.nn.Module, loss_fn, train_sample, test_sample, *, k: int,
                factorized: bool = False, blowup: int = 4, layers=None, **options) -> dict:
    """Selective masks for every captured layer of `model` from small data samples.

    Flat (factorized=False): layer name -> (k,) indices, for SelectiveMask(k, indices=...).
    Factorized: layer name -> (in_indices, out_indices) with k_o'·k_i' ≈ blowup·k (the sides
    FactGraSS would use), for FactGraSS(k, blowup=blowup, masks=...). Layers with at most k
    (flat) or blowup·k (factorized) parameters are left out: the compressors keep those whole.
    `options` go to train_flat_mask / train_factorized_mask (steps, lr, l1, seed).
    """
    attr = Attributor(model, loss_fn, Identity(), layers=layers, progress=False)
    train = attr.features(train_sample).values
    test = attr.features(test_sample).values
    masks: dict = {}
    for name, layer in attr.layers.items():
        shape, cols = layer.shape, layer.columns.cols
        if factorized:
            if blowup * k >= shape.numel:
                continue
            k_out, k_in = mask_sides(blowup * k, shape.d_out, shape.d_in_total)
            side = (-1, shape.d_out, shape.d_in_total)
            masks[name] = train_factorized_mask(train[:, cols].reshape(side),
                                                test[:, cols].reshape(side), k_in=k_in,
                                                k_out=k_out, **options)
        elif k < shape.numel:
            masks[name] = train_flat_mask(train[:, cols], test[:, cols], k, **options)
    return masks


def _array_names(layer: str) -> tuple[str, str, str]:
    return tuple(f"selective-{part}-{layer}" for part in ("flat", "out", "in"))  # type: ignore[return-value]


def save_masks(store: GradientStore, masks: dict) -> None:
    """Save trained masks (as returned by train_masks) with the store, one array per table."""
    for layer, value in masks.items():
        flat, out, in_ = _array_names(layer)
        if isinstance(value, tuple):
            store.save_array(in_, value[0])
            store.save_array(out, value[1])
        else:
            store.save_array(flat, value)


def load_masks(store: GradientStore, layers: Iterable[str] | None = None) -> dict:
    """The masks saved with `store` for `layers` (default: the store's layers), in the form
    train_masks returns; layers without a saved mask are left out."""
    masks: dict = {}
    for layer in store.layout if layers is None else layers:
        flat, out, in_ = _array_names(layer)
        if store.has_array(flat):
            masks[layer] = store.load_array(flat)
        elif store.has_array(out) and store.has_array(in_):
            masks[layer] = (store.load_array(in_), store.load_array(out))
    return masks
