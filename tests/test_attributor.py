"""Attributor: compressor wiring, efim / identity scores against a brute-force computation from
the materialised features, streaming options, resume, and bad input."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import grass
import grass_kernels as gk
from grass.compressors import layer_seed, mask_sides, split_even
from grass_kernels import reference

from conftest import rel_err


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(9, 6), nn.Tanh(), nn.Linear(6, 5, bias=False))


def _data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 9, generator=g), torch.randint(0, 5, (n,), generator=g)


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _attr(compressor, **kw):
    kw.setdefault("batch_size", 4)
    return grass.Attributor(_model(), _loss, compressor, progress=False, **kw)


def _gradients(attr, data) -> dict[str, torch.Tensor]:
    """Materialised per-example G_i per layer (via Identity capture): name -> (n, d_out, d_in')."""
    ident = grass.Attributor(attr.model, _loss, grass.Identity(), layers=list(attr.layers),
                             progress=False)
    values = ident.features(data).values
    out = {}
    for name, layer in ident.layers.items():
        out[name] = values[:, layer.columns.cols].reshape(len(values), layer.shape.d_out, -1)
    return out


# -- compressor wiring: features == the flat map applied to the materialised gradient --------
def _flat_equivalent(compressor, name: str, g: torch.Tensor, seed: int) -> torch.Tensor:
    n, d_out, d_in = g.shape
    flat = g.reshape(n, -1)
    if isinstance(compressor, grass.FactGraSS):
        k_o, k_i = mask_sides(compressor.blowup * compressor.k, d_out, d_in)
        out_idx = gk.random_indices(d_out, k_o, seed=layer_seed(seed, name, "out"))
        in_idx = gk.random_indices(d_in, k_i, seed=layer_seed(seed, name, "in"))
        reduced = g[:, out_idx][:, :, in_idx].reshape(n, -1) * (d_out * d_in / (k_o * k_i)) ** 0.5
        return gk.sjlt(reduced, compressor.k, seed=layer_seed(seed, name, "sjlt"),
                       backend="reference")
    k_o, k_i = split_even(compressor.k, d_out, d_in)
    if isinstance(compressor, grass.LoGra):
        p_in = gk.gaussian_matrix(d_in, k_i, seed=layer_seed(seed, name, "in"))
        p_out = gk.gaussian_matrix(d_out, k_o, seed=layer_seed(seed, name, "out"))
        return (p_out @ g @ p_in.T).reshape(n, -1)
    if isinstance(compressor, grass.FactSJLT):
        # S_out G S_in^T: SJLT the rows of G, then the rows of the transposed result.
        s_in = layer_seed(seed, name, "in")
        s_out = layer_seed(seed, name, "out")
        rows = gk.sjlt(g.reshape(n * d_out, d_in), k_i, seed=s_in, backend="reference")
        cols = rows.reshape(n, d_out, k_i).transpose(1, 2).reshape(n * k_i, d_out)
        both = gk.sjlt(cols, k_o, seed=s_out, backend="reference")
        return both.reshape(n, k_i, k_o).transpose(1, 2).reshape(n, -1)
    if isinstance(compressor, grass.SJLT):
        return gk.sjlt(flat, compressor.k, seed=layer_seed(seed, name, "sjlt"),
                       backend="reference")
    if isinstance(compressor, grass.GraSS):
        idx = gk.random_indices(flat.shape[1], compressor.blowup * compressor.k,
                                seed=layer_seed(seed, name, "mask"))
        return reference.grass(flat, idx, gk.sjlt_codes(len(idx), compressor.k, c=1,
                                                         seed=layer_seed(seed, name, "sjlt")),
                               compressor.k, (flat.shape[1] / len(idx)) ** 0.5)
    if isinstance(compressor, grass.RandomMask):
        idx = gk.random_indices(flat.shape[1], compressor.k, seed=layer_seed(seed, name, "mask"))
        return gk.mask(flat, idx)
    assert isinstance(compressor, grass.Gaussian)
    # Not gk.gaussian (what the compressor calls): its matrix, multiplied here in float64.
    s = layer_seed(seed, name, "gaussian")
    matrix = gk.gaussian_matrix(flat.shape[1], compressor.k, seed=s)
    return flat.double() @ matrix.double().T


@pytest.mark.parametrize(
    "compressor",
    [grass.FactGraSS(k=8), grass.LoGra(k=8), grass.FactSJLT(k=6), grass.SJLT(k=8),
     grass.GraSS(k=4), grass.RandomMask(k=8), grass.Gaussian(k=8)],
    ids=lambda c: type(c).__name__,
)
def test_compressed_features_equal_flat_map_of_gradients(compressor):
    attr = _attr(compressor, seed=3)
    data = _data(7)
    got = attr.features(data).values
    grads = _gradients(attr, data)
    for name, columns in attr.layers.layout.items():
        ref = _flat_equivalent(compressor, name, grads[name], seed=3)
        assert rel_err(got[:, columns.cols], ref) < 1e-5, name


def test_selective_mask_uses_the_given_indices():
    data = _data(6)
    idx = {"0": torch.tensor([3, 17, 40, 59]), "2": torch.tensor([0, 1, 29, 12])}
    attr = _attr(grass.SelectiveMask(k=4, indices=idx))
    got = attr.features(data).values
    grads = _gradients(attr, data)
    for name, columns in attr.layers.layout.items():
        flat = grads[name].reshape(6, -1)
        assert rel_err(got[:, columns.cols], flat[:, idx[name]] * (flat.shape[1] / 4) ** 0.5) < 1e-6
    other = _attr(grass.SelectiveMask(k=4, indices={**idx, "0": torch.tensor([1, 2, 3, 4])}))
    assert other.config != attr.config  # a store made with one mask refuses the other
    with pytest.raises(ValueError, match="no trained indices for layer '2'"):
        _attr(grass.SelectiveMask(k=4, indices={"0": idx["0"]}))


def test_fact_grass_trained_masks_are_used():
    masks = {"0": (torch.tensor([1, 4, 9]), torch.tensor([0, 5])),
             "2": (torch.tensor([0, 5]), torch.tensor([2, 3]))}
    data = _data(5)
    attr = _attr(grass.FactGraSS(k=4, masks=masks))
    got = attr.features(data).values
    grads = _gradients(attr, data)
    for name, columns in attr.layers.layout.items():
        in_idx, out_idx = masks[name]
        g = grads[name]
        scale = (g.shape[1] * g.shape[2] / (len(out_idx) * len(in_idx))) ** 0.5
        ref = gk.sjlt(g[:, out_idx][:, :, in_idx].reshape(5, -1) * scale, 4,
                      seed=layer_seed(0, name, "sjlt"), backend="reference")
        assert rel_err(got[:, columns.cols], ref) < 1e-5


def test_defaults_and_splits():
    assert split_even(4096, 3072, 769) == (64, 64)
    assert mask_sides(4 * 4096, 2304, 769) == (128, 128)
    for k, d_out, d_in in [(512, 10, 65), (24, 3, 100), (4096, 10, 65)]:
        k_o, k_i = split_even(k, d_out, d_in)
        assert k_o * k_i == k
    k_o, k_i = mask_sides(256, 10, 65)  # a narrow output side hands its share to the input side
    assert k_o == 10 and 240 <= k_o * k_i <= 256 and k_i <= 65
    assert grass.GraSS(k=64).blowup == 4 and grass.FactGraSS(k=64).blowup == 4


def test_layer_seeds_are_stable_across_processes():
    code = "from grass.compressors import layer_seed; print(layer_seed(7, 'h.0.mlp'))"
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": str(s)}).stdout
        for s in (1, 2)
    }
    assert outs == {f"{layer_seed(7, 'h.0.mlp')}\n"}
    assert layer_seed(7, "a") != layer_seed(7, "b") != layer_seed(8, "b")


def test_small_layer_kept_uncompressed_with_note(caplog):
    with caplog.at_level(logging.INFO, logger="grass"):
        attr = _attr(grass.FactGraSS(k=40))  # layer 2 has 30 parameters, layer 0 has 60
    assert attr.layers.layout.sizes == {"0": 40, "2": 30}
    assert "layer 2 has 30 parameters <= k = 40; kept uncompressed" in caplog.text


@pytest.mark.parametrize("form", ["tuple", "dataset", "loader"])
def test_data_forms_give_the_same_features(form):
    x, y = _data(10)
    data = {"tuple": (x, y), "dataset": TensorDataset(x, y),
            "loader": DataLoader(TensorDataset(x, y), batch_size=3)}[form]
    attr = _attr(grass.RandomMask(k=8))
    # The loader batches by 3, the others by 4: equal up to float rounding.
    assert rel_err(attr.features(data).values, attr.features([x, y]).values) < 1e-6


# -- scores against brute force -----------------------------------------------------------------
def _brute(attr, train, test, damping, phi=None):
    """Per-layer scores and preconditioned norms from the features in float64; ``phi``
    replaces the train features (n_train, width) when given."""
    phi = attr.features(train).values if phi is None else phi
    phi, psi = phi.double(), attr.features(test).values.double()
    per_layer, norms_tr, norms_te = [], [], []
    for columns in attr.layers.layout.values():
        a, b = phi[:, columns.cols], psi[:, columns.cols]
        if damping is None:
            inv = torch.eye(columns.k, dtype=torch.float64)
        else:
            fim = a.T @ a / len(a)
            inv = torch.linalg.inv(fim + damping * fim.trace() / len(fim) * torch.eye(len(fim)))
        per_layer.append(b @ inv @ a.T)
        norms_tr.append(((a @ inv) * a).sum(1))
        norms_te.append(((b @ inv) * b).sum(1))
    return torch.stack(per_layer), torch.stack(norms_te), torch.stack(norms_tr)


@pytest.mark.parametrize("hessian", ["efim", "identity"])
def test_scores_equal_brute_force(hessian):
    train, test = _data(23), _data(5, seed=9)
    attr = _attr(grass.FactGraSS(k=8), hessian=hessian, damping=0.3, chunk_size=6)
    store = attr.cache(train)
    assert torch.equal(store.read(0, 23), attr.features(train).values)
    layers, n_te, n_tr = _brute(attr, train, test, 0.3 if hessian == "efim" else None)
    total = layers.sum(0)
    assert rel_err(attr.attribute(test), total) < 1e-5
    assert rel_err(attr.attribute(test, per_layer=True), layers) < 1e-5
    cos = total / (n_te.sum(0)[:, None] * n_tr.sum(0)[None]).sqrt()
    assert rel_err(attr.attribute(test, cosine=True), cos) < 1e-5
    cos_layers = layers / (n_te[:, :, None] * n_tr[:, None, :]).sqrt()
    assert rel_err(attr.attribute(test, per_layer=True, cosine=True), cos_layers) < 1e-5
    assert rel_err(attr.self_influence(), n_tr.sum(0)) < 1e-5
    values, indices = attr.top_k(test, k=4)
    ref = total.topk(4, dim=1)
    assert torch.equal(indices, ref.indices) and rel_err(values, ref.values) < 1e-5


def test_rank_deficient_fisher_warns_and_still_scores():
    train, test = _data(3), _data(2, seed=4)  # 3 rows: F_l has rank <= 3 < k = 8
    attr = _attr(grass.RandomMask(k=8), damping=0.0)
    attr.cache(train)
    with pytest.warns(RuntimeWarning, match="damped Fisher of layer"):  # factorised when scoring
        scores = attr.attribute(test)
    assert torch.isfinite(scores).all()


def test_resume_computes_only_missing_rows(tmp_path):
    train = _data(18)
    seen = []
    fail_at = [8]

    def loss_fn(model, batch):
        seen.append(len(batch[0]))
        if fail_at and sum(seen) > fail_at[0]:
            raise RuntimeError("killed")
        return _loss(model, batch)

    def attributor():
        return grass.Attributor(_model(), loss_fn, grass.FactGraSS(k=8), store=tmp_path / "s",
                                batch_size=4, progress=False)

    with pytest.raises(RuntimeError, match="killed"):
        attributor().cache(train)
    assert sum(seen) == 12  # two batches written, the third failed
    fail_at.clear()
    seen.clear()
    store = attributor().cache(train)
    assert sum(seen) == 10  # rows 8..17 only
    fresh = _attr(grass.FactGraSS(k=8), batch_size=4).features(train).values
    assert torch.equal(store.read(0, 18), fresh)


# -- token masks through every compressed map ---------------------------------------------------
TOKEN_COMPRESSORS = [
    grass.Identity(), grass.SJLT(k=8), grass.RandomMask(k=8), grass.GraSS(k=4),
    grass.Gaussian(k=8), grass.LoGra(k=8), grass.FactGraSS(k=8), grass.FactSJLT(k=6),
    grass.SelectiveMask(k=4, indices={"0": torch.tensor([3, 17, 40, 55]),
                                      "2": torch.tensor([0, 1, 29, 44])}),
]


def _token_batch(garbage: bool):
    """(B, T) = (5, 7) tokens of width 6 with lengths 7, 1, 4, 6, 2; the padding holds zeros,
    or with ``garbage`` large random values (finite, so the loss stays finite)."""
    g = torch.Generator().manual_seed(8)
    x, target = torch.randn(5, 7, 6, generator=g), torch.randn(5, 7, 5, generator=g)
    mask = torch.arange(7)[None] < torch.tensor([7, 1, 4, 6, 2])[:, None]
    fill = 1e3 * torch.randn(5, 7, 6, generator=g) if garbage else torch.zeros(5, 7, 6)
    return {"x": torch.where(mask[..., None], x, fill), "attention_mask": mask.long(),
            "target": target}


def _every_token_loss(model, batch):
    """Counts every token, padding included: only the batch's mask can remove the padding."""
    return ((model(batch["x"]) - batch["target"]) ** 2).sum((1, 2))


@pytest.mark.parametrize("compressor", TOKEN_COMPRESSORS, ids=lambda c: type(c).__name__)
def test_token_mask_through_every_map(compressor):
    """Masked tokens holding garbage change nothing, and each example's features equal a run on
    its trimmed sequence (no padding, no mask)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    attr = grass.Attributor(model, _every_token_loss, compressor, batch_size=5, progress=False,
                            seed=2)
    clean = attr.features(_token_batch(garbage=False)).values
    dirty = attr.features(_token_batch(garbage=True)).values
    assert rel_err(dirty, clean) < 1e-6
    batch = _token_batch(garbage=False)
    trimmed = torch.cat([
        attr.features({"x": batch["x"][i:i + 1, :n], "target": batch["target"][i:i + 1, :n]}).values
        for i, n in enumerate(batch["attention_mask"].sum(1).tolist())
    ])
    assert rel_err(clean, trimmed) < 1e-5
    # The padding would matter without the mask.
    unmasked = attr.features({k: v for k, v in batch.items() if k != "attention_mask"}).values
    assert rel_err(unmasked, clean) > 1e-2


# -- the on-disk store: reopening, stored dtype ---------------------------------------------------
def test_store_of_changed_weights_is_refused(tmp_path):
    """A store built from one checkpoint refuses to be extended or scored by another."""
    train = _data(8)
    _attr(grass.FactGraSS(k=8), store=tmp_path / "s").cache(train)
    changed = _model()
    with torch.no_grad():
        changed[0].weight[0, 0] += 1e-3
    attr = grass.Attributor(changed, _loss, grass.FactGraSS(k=8), store=tmp_path / "s",
                            batch_size=4, progress=False)
    with pytest.raises(ValueError, match=r"different configuration.*parameters"):
        attr.cache(train)
    # The same weights reopen it (nothing to recompute).
    assert torch.equal(_attr(grass.FactGraSS(k=8), store=tmp_path / "s").cache(train).read(0, 8),
                       _attr(grass.FactGraSS(k=8)).features(train).values)


# Unit roundoff of the stored 16-bit formats.
STORE_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_store_dtype_end_to_end(tmp_path, dtype):
    """A 16-bit store holds the train features rounded to its dtype and scores exactly as the
    fp32 pipeline does on those rounded rows; against the fp32 store the scores move by the
    rounding only."""
    train, test = _data(23), _data(5, seed=9)
    attr = _attr(grass.FactGraSS(k=8), damping=0.3, store=tmp_path / "s", store_dtype=dtype)
    store = attr.cache(train)
    fp32 = attr.features(train).values
    rounded = fp32.to(dtype).float()
    assert torch.equal(store.read(0, 23).float(), rounded)
    assert rel_err(rounded, fp32) > 0.1 * STORE_ROUNDOFF[dtype]  # it was rounded
    layers, _, _ = _brute(attr, train, test, 0.3, phi=rounded)
    scores = attr.attribute(test)
    assert rel_err(scores, layers.sum(0)) < 1e-5
    full = _attr(grass.FactGraSS(k=8), damping=0.3, store=tmp_path / "f")
    full.cache(train)
    # Rows move by at most u each, relative; through the damped Fisher's inverse and the
    # product the score matrix moves by a fraction of u to a few u (0.44 u measured).
    err = rel_err(scores, full.attribute(test))
    assert 1e-5 < err < 4 * STORE_ROUNDOFF[dtype], err


# -- bad input ----------------------------------------------------------------------------------
def test_empty_dataset_is_refused():
    attr = _attr(grass.FactGraSS(k=8))
    with pytest.raises(ValueError, match="train_data is empty"):
        attr.cache((torch.zeros(0, 9), torch.zeros(0, dtype=torch.long)))


def test_layers_matching_nothing_is_refused():
    with pytest.raises(ValueError, match=r"layers=\['decoder\.\*'\] matches no linear layer"):
        _attr(grass.FactGraSS(k=8), layers=["decoder.*"])


def test_features_of_another_compressor_are_refused():
    train, test = _data(8), _data(3)
    attr = _attr(grass.FactGraSS(k=8))
    attr.cache(train)
    other = _attr(grass.LoGra(k=8)).features(test)
    with pytest.raises(ValueError, match=r"different configuration.*compressor"):
        attr.attribute(other)
    assert attr.attribute(attr.features(test)).shape == (3, 8)


def test_store_of_another_configuration_is_refused(tmp_path):
    train = _data(8)
    _attr(grass.FactGraSS(k=8), store=tmp_path / "s").cache(train)
    with pytest.raises(ValueError, match="different configuration"):
        _attr(grass.FactGraSS(k=8, c=2), store=tmp_path / "s").cache(train)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(hessian="kfac"), ValueError, "hessian must be one of"),
        (dict(damping=-1.0), ValueError, "damping must be a float >= 0"),
        (dict(batch_size=0), ValueError, "batch_size must be a positive int"),
        (dict(compressor="FactGraSS"), TypeError, "compressor must be a grass compressor"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    kwargs.setdefault("compressor", grass.FactGraSS(k=8))
    with pytest.raises(error, match=match):
        grass.Attributor(_model(), _loss, **kwargs)


def test_bad_compressor_configs_and_data():
    with pytest.raises(ValueError, match="k must be a positive int"):
        grass.FactGraSS(k=0)
    with pytest.raises(TypeError, match="blowup must be a positive int"):
        grass.GraSS(k=8, blowup=2.5)
    attr = _attr(grass.FactGraSS(k=8))
    with pytest.raises(RuntimeError, match="call cache"):
        attr.attribute(_data(2))
    x, y = _data(6)
    with pytest.raises(ValueError, match="shuffle=False"):
        attr.cache(DataLoader(TensorDataset(x, y), batch_size=2, shuffle=True))
    with pytest.raises(ValueError, match="share their first dimension"):
        attr.cache((x, y[:4]))
    big = grass.Attributor(nn.Linear(200, 100), lambda m, b: m(b).sum(1), grass.Identity(),
                           progress=False)  # efim would need a 20100 x 20100 matrix
    with pytest.raises(ValueError, match="at most k_l = "):
        big.cache(torch.randn(2, 200))


def test_factor_precision_follows_the_condition_bound():
    """The damped factor is fp32 where the damping bounds the condition number (the default
    relative damping always does), fp64 where it does not, and fp32 factors score like fp64."""
    from grass.curvature import FP32_FACTOR_CONDITION, Preconditioner, damped_cholesky
    from grass.layers import Layout

    torch.manual_seed(3)
    k = 48
    phi = torch.randn(200, k) * torch.arange(1, k + 1).float() ** -1.0
    fisher = phi.T @ phi / 200
    assert damped_cholesky(fisher, 0.5).dtype == torch.float32
    tiny = float(fisher.trace()) / FP32_FACTOR_CONDITION / 10  # bound about 10 x the limit
    assert damped_cholesky(fisher, 0.0, absolute_damping=tiny).dtype == torch.float64
    test = torch.randn(5, k)
    got = Preconditioner.efim({"layer": fisher}, Layout([("layer", k)]), 0.5)(test)
    exact = torch.linalg.solve(fisher.double() + 0.5 * float(fisher.trace()) / k
                               * torch.eye(k, dtype=torch.float64), test.double().T).T
    assert float((got.double() - exact).norm() / exact.norm()) < 1e-5
