"""Selective Mask: the optimisation finds the informative coordinates, and a mask saved with a
store is the one the compressors use after reloading it."""

import math

import pytest
import torch

import grass_kernels as gk
from grass import Attributor, FactGraSS, GradientStore, Identity, SelectiveMask
from grass.compressors import layer_seed
from grass.demo.digits import load_digits, per_example_loss
from grass.selective import (
    _pairwise_corr,
    load_masks,
    save_masks,
    train_factorized_mask,
    train_flat_mask,
    train_masks,
)
from grass.store import StoreError


def _planted(n: int, d: int, signal: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(n, d) gradients: unit-variance coordinates on `signal`, weak noise elsewhere."""
    g = 0.15 * torch.randn(n, d, generator=gen)
    g[:, signal] = torch.randn(n, len(signal), generator=gen)
    return g


def test_flat_mask_keeps_the_informative_coordinates():
    gen = torch.Generator().manual_seed(0)
    d, k = 200, 12
    signal = torch.randperm(d, generator=gen)[:k].sort().values
    train, test = _planted(64, d, signal, gen), _planted(16, d, signal, gen)
    kept = train_flat_mask(train, test, k, steps=150)
    assert kept.dtype == torch.int64 and kept.shape == (k,) and torch.equal(kept, kept.unique())
    assert len(set(kept.tolist()) & set(signal.tolist())) >= k - 1
    full = test @ train.T
    random = torch.randperm(d, generator=gen)[:k]
    corr = {name: float(_pairwise_corr(full, test[:, idx] @ train[:, idx].T))
            for name, idx in (("selective", kept), ("random", random))}
    assert corr["selective"] > corr["random"] + 0.3, corr


def test_factorized_mask_keeps_the_informative_rows_and_columns():
    gen = torch.Generator().manual_seed(1)
    d_out, d_in, k_out, k_in = 20, 30, 4, 5
    rows, cols = torch.tensor([1, 7, 8, 15]), torch.tensor([0, 3, 11, 20, 29])

    def sample(n):  # G_i = u_i v_iᵀ with the energy on the planted rows and columns
        u = 0.1 * torch.randn(n, d_out, generator=gen)
        v = 0.1 * torch.randn(n, d_in, generator=gen)
        u[:, rows] = torch.randn(n, len(rows), generator=gen)
        v[:, cols] = torch.randn(n, len(cols), generator=gen)
        return u[:, :, None] * v[:, None, :]

    in_idx, out_idx = train_factorized_mask(sample(48), sample(12), k_in=k_in, k_out=k_out,
                                            steps=150)
    assert torch.equal(out_idx, rows) and torch.equal(in_idx, cols)


def test_mask_bad_input():
    g = torch.randn(8, 10)
    with pytest.raises(ValueError, match=r"k must be in \[1, D=10\]"):
        train_flat_mask(g, g, 11)
    with pytest.raises(ValueError, match="test must have D=10"):
        train_flat_mask(g, g[:, :9], 3)
    with pytest.raises(ValueError, match="train must be a 2-D tensor"):
        train_flat_mask(g[0], g, 3)
    with pytest.raises(ValueError, match="k_out <= d_out=2"):
        train_factorized_mask(g.view(8, 2, 5), g.view(8, 2, 5), k_in=2, k_out=3)


@pytest.fixture(scope="module")
def digits():
    task = load_digits(96, 12, hidden=16, epochs=30)
    return task, task.train(seed=0)


def _reloaded_attributor(path, model, make):
    """Attributor with the masks read back from the store at `path`."""
    masks = load_masks(GradientStore.load(path))
    return Attributor(model, per_example_loss, make(masks), store=path, progress=False), masks


def test_saved_flat_mask_is_the_one_used(digits, tmp_path):
    task, model = digits
    train, test = (task.x_train, task.y_train), (task.x_test, task.y_test)
    k = 64
    masks = train_masks(model, per_example_loss, (task.x_train[:48], task.y_train[:48]), test,
                        k=k, steps=40)
    assert set(masks) == {"0", "2"}
    first = Attributor(model, per_example_loss, SelectiveMask(k, indices=masks),
                       store=tmp_path / "s", progress=False)
    first.cache(train)
    save_masks(first.store, masks)

    again, loaded = _reloaded_attributor(tmp_path / "s", model, lambda m: SelectiveMask(k, indices=m))
    assert all(torch.equal(loaded[name], masks[name]) for name in masks)
    again.cache(train)  # the reloaded masks reproduce the store's configuration: nothing recomputed
    assert again.store.missing() == []
    # The features are exactly the gradient coordinates the saved mask names (rescaled).
    full = Attributor(model, per_example_loss, Identity(), progress=False)
    grads = full.features(test).values
    got = again.features(test).values
    for name, columns in full.layers.layout.items():
        scale = math.sqrt(columns.k / k)
        assert torch.allclose(got[:, again.layers[name].columns.cols],
                              grads[:, columns.cols][:, loaded[name]] * scale, rtol=1e-5, atol=1e-6)
    # Another mask is another configuration: the store refuses it instead of mixing features.
    other = {name: gk.random_indices(c.k, k, seed=5) for name, c in full.layers.layout.items()}
    with pytest.raises(StoreError, match="different configuration"):
        Attributor(model, per_example_loss, SelectiveMask(k, indices=other), store=tmp_path / "s",
                   progress=False).cache(train)


def test_saved_factorized_mask_is_the_one_fact_grass_uses(digits, tmp_path):
    task, model = digits
    train, test = (task.x_train, task.y_train), (task.x_test, task.y_test)
    k = 16
    masks = train_masks(model, per_example_loss, (task.x_train[:48], task.y_train[:48]), test,
                        k=k, factorized=True, steps=40)
    first = Attributor(model, per_example_loss, FactGraSS(k, masks=masks), store=tmp_path / "s",
                       progress=False)
    first.cache(train)
    save_masks(first.store, masks)

    again, loaded = _reloaded_attributor(tmp_path / "s", model, lambda m: FactGraSS(k, masks=m))
    again.cache(train)
    assert again.store.missing() == []
    full = Attributor(model, per_example_loss, Identity(), progress=False)
    grads = full.features(test).values
    got = again.features(test).values
    for name, (in_idx, out_idx) in loaded.items():
        assert torch.equal(in_idx, masks[name][0]) and torch.equal(out_idx, masks[name][1])
        module = dict(model.named_modules())[name]
        g = grads[:, full.layers[name].columns.cols].reshape(-1, module.out_features,
                                                              module.in_features + 1)
        kept = g[:, out_idx][:, :, in_idx].flatten(1)
        scale = math.sqrt(g[0].numel() / kept.shape[1])  # the mask's rescaling
        want = gk.sjlt(kept * scale, k, seed=layer_seed(0, name, "sjlt"))
        assert torch.allclose(got[:, again.layers[name].columns.cols], want, rtol=1e-4, atol=1e-5)
