"""hessian="fisher" (targets sampled from the model), absolute damping and checkpoint ensembles.

The convex check of Koh & Liang: for an L2-regularised softmax regression the Fisher at the
model's own predictions is its Hessian (less the L2 term, which absolute damping supplies), so
influence must predict actual leave-one-out retraining; the retrained models are the oracle.
"""

from __future__ import annotations


import pytest
import torch
from torch import nn
from torch.nn import functional as F

import grass
from bench.ranks import free_port, gloo_group, launch
from grass.demo.digits import make_mlp, per_example_loss, sampled_label_loss
from grass.fisher import draw_generator

# -- the convex model --------------------------------------------------------------------------
N_TRAIN, D, CLASSES, WEIGHT_DECAY, N_LOO = 200, 5, 3, 1e-2, 30


def _regression_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + 1, D, generator=g, dtype=torch.float64)
    truth = torch.randn(D, CLASSES, generator=g, dtype=torch.float64)
    labels = torch.multinomial((x @ truth).softmax(1), 1, generator=g).squeeze(1)
    return x[:N_TRAIN], labels[:N_TRAIN], x[N_TRAIN:], labels[N_TRAIN:]


def _fit(x, y, init: nn.Linear | None = None) -> nn.Linear:
    """argmin mean CE + WEIGHT_DECAY / 2 * (|W|^2 + |b|^2), fp64, LBFGS to convergence."""
    model = nn.Linear(D, CLASSES).double()
    if init is not None:
        model.load_state_dict(init.state_dict())
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12,
                            tolerance_change=1e-15, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        penalty = sum(p.pow(2).sum() for p in model.parameters())
        loss = F.cross_entropy(model(x), y) + WEIGHT_DECAY / 2 * penalty
        loss.backward()
        return loss

    opt.step(closure)
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert grad.abs().max() < 1e-7, "the retraining oracle did not converge"
    return model


def _test_loss(model, x, y) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


@pytest.fixture(scope="module")
def leave_one_out():
    """(full model, train, test, actual LOO change of the test loss for the first N_LOO rows)."""
    x, y, x_test, y_test = _regression_data()
    full = _fit(x, y)
    base = _test_loss(full, x_test, y_test)
    keep = torch.ones(N_TRAIN, dtype=torch.bool)
    changes = []
    for i in range(N_LOO):
        keep[i] = False
        changes.append(_test_loss(_fit(x[keep], y[keep], init=full), x_test, y_test) - base)
        keep[i] = True
    return full.float(), (x.float(), y), (x_test.float(), y_test), torch.tensor(changes)


def _predicted_change(model, train, test, **options) -> torch.Tensor:
    """Influence on the test loss of removing each train row: +score (helpful rows' removal
    raises the loss), for the first N_LOO rows."""
    attr = grass.Attributor(model, per_example_loss, grass.Identity(), batch_size=N_TRAIN,
                            progress=False, **options)
    attr.cache(train)
    return attr.attribute(test)[0, :N_LOO]


def test_fisher_with_weight_decay_predicts_leave_one_out(leave_one_out):
    model, train, test, actual = leave_one_out
    fisher = _predicted_change(model, train, test, hessian="fisher",
                               fisher_loss_fn=sampled_label_loss, fisher_samples=64,
                               absolute_damping=WEIGHT_DECAY)
    efim = _predicted_change(model, train, test, hessian="efim")
    efim_abs = _predicted_change(model, train, test, hessian="efim", absolute_damping=WEIGHT_DECAY)
    r_fisher, r_efim, r_efim_abs = (_pearson(p, actual) for p in (fisher, efim, efim_abs))
    print(f"\nPearson with {N_LOO} leave-one-out retrainings: fisher (64 draws, absolute "
          f"damping = weight decay) {r_fisher:.4f}; efim (relative 0.5) {r_efim:.4f}; "
          f"efim (absolute = weight decay) {r_efim_abs:.4f}")
    assert r_fisher >= 0.99
    # The first-order prediction of the change, not only its direction: fisher scores / n.
    slope = float((fisher / N_TRAIN * actual).sum() / (fisher / N_TRAIN).pow(2).sum())
    assert 0.8 < slope < 1.25, slope


def test_exact_class_fisher_is_the_hessian_of_softmax_regression(leave_one_out):
    """For softmax regression the expected Fisher over the model's own labels is the Hessian of
    the mean cross-entropy, exactly: with absolute damping = L2 the scores are exact influence."""
    from grass.fisher import ExactClasses

    model, train, test, actual = leave_one_out
    exact = ExactClasses(lambda m, batch: m(batch[0]).log_softmax(1), CLASSES)
    scores = _predicted_change(model, train, test, hessian="fisher", fisher_loss_fn=exact,
                               absolute_damping=WEIGHT_DECAY)
    x, y = (t.double() if t.is_floating_point() else t for t in train)
    w, b = model.weight.detach().double(), model.bias.detach().double()

    def objective(w, b):
        return F.cross_entropy(x @ w.T + b, y) + WEIGHT_DECAY / 2 * (w.pow(2).sum() + b.pow(2).sum())

    (hww, hwb), (hbw, hbb) = torch.autograd.functional.hessian(objective, (w, b))
    k = w.numel()
    hessian = torch.cat([torch.cat([hww.reshape(k, k), hwb.reshape(k, CLASSES)], 1),
                         torch.cat([hbw.reshape(CLASSES, k), hbb], 1)])

    def grad(xs, ys):
        wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            F.cross_entropy(xs @ wg.T + bg, ys), (wg, bg))])

    g_test = grad(test[0].double(), test[1])
    influence = torch.stack([g_test @ torch.linalg.solve(hessian, grad(x[i:i + 1], y[i:i + 1]))
                             for i in range(N_LOO)])
    torch.testing.assert_close(scores.double(), influence, rtol=2e-3, atol=1e-4 * influence.abs().max())
    assert _pearson(scores, actual) >= 0.998
    with pytest.raises(TypeError, match="not a sampling loss"):
        exact(model, train, None)


def test_fisher_is_reproducible_and_seeded():
    model = make_mlp(6, 8, 4, seed=1)
    g = torch.Generator().manual_seed(2)
    train = (torch.randn(40, 6, generator=g), torch.randint(0, 4, (40,), generator=g))
    test = (torch.randn(5, 6, generator=g), torch.randint(0, 4, (5,), generator=g))

    def scores(seed):
        attr = grass.Attributor(model, per_example_loss, grass.Identity(), hessian="fisher",
                                fisher_loss_fn=sampled_label_loss, fisher_samples=2,
                                absolute_damping=1e-3, batch_size=16, seed=seed, progress=False)
        attr.cache(train)
        return attr.attribute(test)

    first, again, other = scores(0), scores(0), scores(1)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other, rtol=1e-3)


def _causal_lm(arch: str):
    transformers = pytest.importorskip("transformers", reason="needs transformers for the LMs")
    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=17, n_positions=8, n_embd=8, n_layer=1,
                                         n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0, tie_word_embeddings=False)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(vocab_size=17, hidden_size=8, intermediate_size=16,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=8,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fisher_of_causal_lm_equals_per_example_autograd_at_the_drawn_targets(arch):
    """The whole pass (capture, draws, sums, damping, scores) against an oracle built from
    autograd gradients of each example's loss at the same drawn tokens."""
    model = _causal_lm(arch)
    ids = torch.randint(0, 17, (6, 8), generator=torch.Generator().manual_seed(1))
    test_ids = torch.randint(0, 17, (2, 8), generator=torch.Generator().manual_seed(2))

    def observed_loss(model, ids):
        logits = model(input_ids=ids).logits[:, :-1]
        return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    def drawn_loss(model, ids, generator):
        logits = model(input_ids=ids).logits[:, :-1]
        probs = logits.detach().softmax(-1).reshape(-1, 17)
        drawn = torch.multinomial(probs, 1, generator=generator).view(ids.shape[0], -1)
        return F.cross_entropy(logits.transpose(1, 2), drawn, reduction="none").mean(1)

    layer, draws, lam = "lm_head", 3, 1e-2
    attr = grass.Attributor(model, observed_loss, grass.Identity(), layers=layer,
                            hessian="fisher", fisher_loss_fn=drawn_loss, fisher_samples=draws,
                            absolute_damping=lam, batch_size=4, progress=False)
    attr.cache(ids)
    scores = attr.attribute(test_ids)

    weight = model.lm_head.weight  # (17, 8), no bias

    def per_example_grads(losses):
        return torch.stack([torch.autograd.grad(l, weight, retain_graph=True)[0].reshape(-1)
                            for l in losses]).double()

    fisher = torch.zeros(weight.numel(), weight.numel(), dtype=torch.float64)
    for first in range(0, ids.shape[0], 4):  # the Attributor's batches
        for draw in range(draws):
            g = per_example_grads(drawn_loss(model, ids[first:first + 4],
                                             draw_generator(0, draw, first, torch.device("cpu"))))
            fisher += g.T @ g
    fisher /= ids.shape[0] * draws
    train_g, test_g = per_example_grads(observed_loss(model, ids)), per_example_grads(
        observed_loss(model, test_ids))
    expected = test_g @ torch.linalg.solve(fisher + lam * torch.eye(len(fisher),
                                                                    dtype=torch.float64), train_g.T)
    torch.testing.assert_close(scores.double(), expected, rtol=2e-4, atol=1e-6 * expected.abs().max())


def test_missing_fisher_loss_fn_and_conflicting_damping_are_refused():
    model = make_mlp(4, 3, 2)
    with pytest.raises(ValueError, match="fisher_loss_fn=f with f\\(model, batch, generator\\)"):
        grass.Attributor(model, per_example_loss, grass.Identity(), hessian="fisher")
    with pytest.raises(ValueError, match="both given|were both"):
        grass.Attributor(model, per_example_loss, grass.Identity(), damping=0.1,
                         absolute_damping=1e-3)
    with pytest.raises(ValueError, match="absolute_damping must be a float >= 0"):
        grass.Attributor(model, per_example_loss, grass.Identity(), absolute_damping=-1.0)
    with pytest.raises(ValueError, match="fisher_samples must be a positive int"):
        grass.Attributor(model, per_example_loss, grass.Identity(), hessian="fisher",
                         fisher_loss_fn=sampled_label_loss, fisher_samples=0)


def test_absolute_damping_is_lambda_times_identity():
    """Scores with absolute_damping=lam equal phi_j^T (F + lam I)^{-1} phi_i from the store."""
    model = make_mlp(5, 4, 3, seed=2)
    g = torch.Generator().manual_seed(3)
    train = (torch.randn(30, 5, generator=g), torch.randint(0, 3, (30,), generator=g))
    test = (torch.randn(4, 5, generator=g), torch.randint(0, 3, (4,), generator=g))
    attr = grass.Attributor(model, per_example_loss, grass.Identity(), absolute_damping=0.05,
                            layers="2", progress=False)
    store = attr.cache(train)
    phi = store.read(0, 30).double()
    test_phi = attr.features(test).values.double()
    fisher = phi.T @ phi / 30
    expected = test_phi @ torch.linalg.solve(fisher + 0.05 * torch.eye(len(fisher),
                                                                       dtype=torch.float64), phi.T)
    torch.testing.assert_close(attr.attribute(test).double(), expected, rtol=1e-4, atol=1e-7)


# -- resume and ranks --------------------------------------------------------------------------
N_ROWS, BATCH = 37, 4  # odd: the last batch is short and rank shares cut through batches


def _rows(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 7, generator=g), torch.randint(0, 4, (n,), generator=g)


def _fisher_attributor(store, fisher_loss_fn=sampled_label_loss) -> grass.Attributor:
    return grass.Attributor(make_mlp(7, 6, 4, seed=5), per_example_loss, grass.FactGraSS(k=16),
                            hessian="fisher", fisher_loss_fn=fisher_loss_fn, fisher_samples=3,
                            absolute_damping=1e-3, store=store, batch_size=BATCH, chunk_size=8,
                            progress=False)


def _scores(attr: grass.Attributor) -> torch.Tensor:
    attr.cache(_rows(N_ROWS, 1))
    return attr.attribute(_rows(5, 2))


def test_killed_fisher_pass_resumes_from_its_checkpoint(tmp_path):
    calls = {"batches": 0}

    def dies_after_five(model, batch, generator):
        if calls["batches"] == 5 * 3:  # five batches of three draws each
            raise KeyboardInterrupt("killed")
        calls["batches"] += 1
        return sampled_label_loss(model, batch, generator)

    with pytest.raises(KeyboardInterrupt):
        _scores(_fisher_attributor(tmp_path / "store", dies_after_five))
    calls["batches"] = 0

    def counting(model, batch, generator):
        calls["batches"] += 1
        return sampled_label_loss(model, batch, generator)

    resumed = _scores(_fisher_attributor(tmp_path / "store", counting))
    # Checkpoints every 8 rows (two batches): batches 1-4 were saved, the 5th was lost.
    assert calls["batches"] == (10 - 4) * 3
    uninterrupted = _scores(_fisher_attributor(tmp_path / "fresh"))
    assert torch.equal(resumed, uninterrupted)
    # A finished pass is read back whole: nothing is recomputed.
    calls["batches"] = 0
    assert torch.equal(_scores(_fisher_attributor(tmp_path / "store", counting)), uninterrupted)
    assert calls["batches"] == 0


def _rank(rank: int, world: int, port: int, store: str, out: str) -> None:
    with gloo_group(rank, world, port, timeout_s=90):
        scores = _scores(_fisher_attributor(store))
        if rank == 0:
            torch.save(scores, out)


def test_fisher_sharded_over_two_ranks_equals_one_process(tmp_path):
    out = str(tmp_path / "scores.pt")
    launch(_rank, 2, (2, free_port(), str(tmp_path / "ranks"), out))
    single = _scores(_fisher_attributor(tmp_path / "single"))
    torch.testing.assert_close(torch.load(out), single, rtol=1e-5, atol=1e-6 * single.abs().max())


# -- ensembles ---------------------------------------------------------------------------------
def test_ensemble_scores_are_the_mean_of_its_members(tmp_path):
    train, test = _rows(N_ROWS, 1), _rows(5, 2)
    members = [grass.Attributor(make_mlp(7, 6, 4, seed=s), per_example_loss, grass.LoGra(k=16),
                                store=tmp_path / f"m{s}", batch_size=BATCH, progress=False)
               for s in range(3)]
    ensemble = grass.Ensemble(members)
    stores = ensemble.cache(train)
    assert len({s.path for s in stores}) == 3
    alone = torch.stack([m.attribute(test) for m in members])
    assert not torch.allclose(alone[0], alone[1])  # the members really differ
    torch.testing.assert_close(ensemble.attribute(test), alone.mean(0))
    torch.testing.assert_close(ensemble.self_influence(),
                               torch.stack([m.self_influence() for m in members]).mean(0))
    values, indices = ensemble.top_k(test, 4)
    torch.testing.assert_close(values, alone.mean(0).topk(4, dim=1).values)
    assert torch.equal(indices, alone.mean(0).topk(4, dim=1).indices)


def test_ensemble_refuses_shared_stores_and_non_attributors(tmp_path):
    model = make_mlp(7, 6, 4)
    same = [grass.Attributor(model, per_example_loss, grass.Identity(), store=tmp_path / "s")
            for _ in range(2)]
    with pytest.raises(ValueError, match="distinct stores"):
        grass.Ensemble(same)
    with pytest.raises(TypeError, match="grass.Attributor"):
        grass.Ensemble([model])
    with pytest.raises(TypeError, match="non-empty"):
        grass.Ensemble([])
