"""grass.lds against a brute-force Spearman, the retraining harness on a tiny config, and the
digits task it runs on."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import grass
from grass.demo.digits import load_digits, margins
from grass.demo.retrain import random_subsets, subset_targets
from grass.lds import lds_per_example, spearman_columns


def _brute_force_lds(scores, subsets, targets) -> float:
    predicted = (subsets.double() @ scores.double().T).numpy()
    rhos = [spearmanr(predicted[:, j], targets[:, j].numpy()).statistic for j in range(scores.shape[0])]
    return float(np.nanmean(rhos))


@pytest.mark.parametrize("seed", range(3))
def test_lds_equals_brute_force_spearman(seed):
    g = torch.Generator().manual_seed(seed)
    n_test, n_train, n_subsets = 7, 53, 31
    scores = torch.randn(n_test, n_train, generator=g)
    subsets = torch.rand(n_subsets, n_train, generator=g) < 0.5
    # Targets correlated with the truth but noisy, and rounded so that ties occur.
    targets = (subsets.float() @ scores.T + 2 * torch.randn(n_subsets, n_test, generator=g)).round()
    got = grass.lds(scores, subsets, targets)
    assert got == pytest.approx(_brute_force_lds(scores, subsets, targets), abs=1e-12)
    assert 0.2 < got < 1  # the signal is there, the noise too


def test_spearman_ties_and_constant_columns():
    a = torch.tensor([[1.0, 5.0], [2.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    b = torch.tensor([[4.0, 1.0], [1.0, 2.0], [1.0, 3.0], [0.0, 4.0]])
    rho = spearman_columns(a, b)
    assert rho[0].item() == pytest.approx(spearmanr(a[:, 0], b[:, 0]).statistic)
    assert torch.isnan(rho[1])  # no variation in a[:, 1]
    # A test example whose prediction never varies is left out of the mean, not counted as 0.
    scores = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    subsets = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1]], dtype=torch.bool)
    targets = torch.tensor([[1.0, 9.0], [2.0, 8.0], [3.0, 7.0], [4.0, 6.0]])
    assert grass.lds(scores, subsets, targets) == pytest.approx(1.0)


def test_lds_bad_input():
    scores, subsets, targets = torch.randn(3, 10), torch.rand(5, 10) < 0.5, torch.randn(5, 3)
    with pytest.raises(TypeError, match="subsets must be a bool tensor"):
        grass.lds(scores, subsets.float(), targets)
    with pytest.raises(ValueError, match=r"subsets must be \(n_subsets, n_train=10\)"):
        grass.lds(scores, subsets[:, :9], targets)
    with pytest.raises(ValueError, match=r"targets must be \(n_subsets=5, n_test=3\)"):
        grass.lds(scores, subsets, targets.T)
    with pytest.raises(ValueError, match="scores must be a 2-D tensor"):
        grass.lds(scores[0], subsets, targets)
    with pytest.raises(ValueError, match="at least 3 subsets"):
        grass.lds(scores, subsets[:2], targets[:2])
    with pytest.raises(ValueError, match="fraction must be in"):
        random_subsets(10, 4, fraction=1.0)


def test_random_subsets_are_half_and_prefix_stable():
    a = random_subsets(101, 60, seed=3)
    assert a.dtype == torch.bool and (a.sum(1) == 50).all()
    assert torch.equal(random_subsets(101, 20, seed=3), a[:20])  # a cache of more serves fewer
    assert not torch.equal(random_subsets(101, 20, seed=4), a[:20])
    assert len({tuple(r.tolist()) for r in a}) == 60


@pytest.fixture(scope="module")
def tiny_task():
    return load_digits(120, 15, hidden=8, epochs=40, seed=1)


def test_batched_training_equals_one_at_a_time(tiny_task):
    subsets = random_subsets(tiny_task.n_train, 3, seed=0)
    together = tiny_task.train_many(subsets, [5, 6, 7])
    alone = tiny_task.train(subsets[1], seed=6)
    assert torch.allclose(tiny_task.test_margins(together[1]), tiny_task.test_margins(alone),
                          rtol=1e-4, atol=1e-4)
    assert not torch.allclose(tiny_task.test_margins(together[0]), tiny_task.test_margins(alone))


def test_margins_match_definition():
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    logits = model(x).detach()
    for i in range(6):
        others = torch.cat([logits[i, :y[i]], logits[i, y[i] + 1:]])
        assert margins(model, x, y)[i].item() == pytest.approx(
            (logits[i, y[i]] - others.logsumexp(0)).item(), rel=1e-5)


def test_harness_retrains_caches_and_resumes(tiny_task, tmp_path):
    calls = []

    def evaluate(subsets, seeds):
        calls.append(list(seeds))
        return torch.stack([tiny_task.test_margins(m) for m in tiny_task.train_many(subsets, seeds)])

    cache = tmp_path / "targets.npz"
    config = {"task": "tiny"}
    subsets, targets = subset_targets(evaluate, tiny_task.n_train, n_subsets=5, batch=2, seed=9,
                                      cache=cache, config=config, progress=False)
    assert calls == [[9, 10], [11, 12], [13]]
    assert subsets.shape == (5, 120) and targets.shape == (5, 15)
    assert torch.isfinite(targets).all() and targets.std(0).min() > 0  # subsets do matter
    # The targets are the retrained models' margins, recomputed independently here.
    again = tiny_task.train(subsets[3], seed=12)
    assert torch.allclose(targets[3], tiny_task.test_margins(again), rtol=1e-4, atol=1e-4)

    calls.clear()  # a rerun reads the cache, a larger run extends it
    s2, t2 = subset_targets(evaluate, tiny_task.n_train, n_subsets=6, batch=2, seed=9,
                            cache=cache, config=config, progress=False)
    assert calls == [[14]] and torch.equal(t2[:5], targets) and torch.equal(s2[:5], subsets)
    calls.clear()  # another configuration never reuses the cache
    subset_targets(evaluate, tiny_task.n_train, n_subsets=3, batch=3, seed=9, cache=cache,
                   config={"task": "other"}, progress=False)
    assert calls == [[9, 10, 11]]


def test_load_digits_bad_sizes():
    with pytest.raises(ValueError, match="n_train \\+ n_test <= 1797"):
        load_digits(1700, 200)


def test_lds_per_example_is_spearman_per_test_example():
    g = torch.Generator().manual_seed(4)
    scores, targets = torch.randn(6, 20, generator=g), torch.randn(9, 6, generator=g)
    subsets = random_subsets(20, 9, seed=1)
    per = lds_per_example(scores, subsets, targets)
    predicted = (subsets.double() @ scores.double().T).numpy()
    expected = [spearmanr(predicted[:, j], targets[:, j].numpy()).statistic for j in range(6)]
    np.testing.assert_allclose(per.numpy(), expected, rtol=1e-12)
    assert grass.lds(scores, subsets, targets) == pytest.approx(float(per.mean()))


def test_bootstrap_intervals_match_the_normal_theory_and_pair_differences():
    from grass.lds import bootstrap_means

    g = torch.Generator().manual_seed(5)
    a = 0.3 + 0.1 * torch.randn(400, generator=g, dtype=torch.float64)
    b = a + 0.02 + 0.01 * torch.randn(400, generator=g, dtype=torch.float64)
    a_nan = a.clone()
    a_nan[7] = float("nan")
    stats = bootstrap_means({"a": a, "b": b, "b - a": b - a}, n_boot=4000)
    mean, low, high = stats["a"]
    assert mean == pytest.approx(float(a.mean()))
    # Normal theory: half-width 1.96 * sd / sqrt(n).
    assert (high - low) / 2 == pytest.approx(1.96 * float(a.std()) / 20, rel=0.15)
    # The paired difference is far narrower than either mean's interval and excludes 0.
    d_mean, d_low, d_high = stats["b - a"]
    assert d_mean == pytest.approx(0.02, abs=0.003) and d_low > 0
    assert (d_high - d_low) < (high - low) / 5
    # An example that is NaN for one method is left out of every method.
    kept = bootstrap_means({"a": a_nan, "b": b})
    assert kept["b"][0] == pytest.approx(float(torch.cat([b[:7], b[8:]]).mean()))
    with pytest.raises(ValueError, match="at least one method"):
        bootstrap_means({})
