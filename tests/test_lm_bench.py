"""Smoke test of the language-model benchmark (bench/lm.py --quick): the whole pipeline runs
(data, training, subset retraining averaged over seeds with its on-disk ground truth,
attribution with every method, LDS with bootstrap intervals, outputs) and its numbers hold
together."""

import json
import sys
from pathlib import Path

import pytest

# bench/ is a first-party package at the repository root, which plain `pytest` does not put on
# sys.path (only `python -m pytest` does): import it from there, never skip.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import lm  # noqa: E402


def _interval(text: str) -> tuple[float, float]:
    low, high = text.strip("[]").split(",")
    return float(low), float(high)


def test_lm_quick_runs_and_writes_consistent_results(tmp_path):
    results = lm.run(lm.QUICK, tmp_path, progress=False, members=2)

    rows = results["rows"]
    assert [r["method"] for r in rows] == [m.label for m in lm.methods(2, lm.QUICK.fisher_samples)]
    for row in rows:
        low, high = _interval(row["95% CI"])
        assert -1 <= low <= row["LDS"] <= high <= 1, row
        assert row["CI half-width"] == pytest.approx((high - low) / 2, abs=1e-4)
    by_name = {r["method"]: r["LDS"] for r in rows}
    for diff in results["differences"]:
        a, b = diff["difference"].split(" - ")
        # Means of paired differences over the same test examples are differences of means.
        assert diff["mean"] == pytest.approx(by_name[a] - by_name[b], abs=2e-4), diff
        low, high = _interval(diff["95% CI"])
        assert diff["significant"] == ("yes" if low > 0 or high < 0 else "no")
    timed = {t["timed"] for t in results["timings"]}
    assert {"FactGraSS", "LoGra", "Identity", "FactGraSS efim",
            f"FactGraSS fisher S={lm.QUICK.fisher_samples}"} <= timed
    for t in results["timings"]:
        assert t["part"] == ("capture" if t["timed"] in ("FactGraSS", "LoGra", "FactSJLT", "Identity")
                             else "curvature"), t
        assert t["seconds"] > 0 and t["over a training epoch"] > 0 and t["tokens/s"] > 0, t
    saved = json.loads((tmp_path / "lm.json").read_text())
    assert saved["rows"] == rows
    assert (tmp_path / "lm_lds.png").stat().st_size > 0
    assert "| method" in (tmp_path / "lm.md").read_text()


def test_lm_ground_truth_is_cached_and_reused(tmp_path, monkeypatch):
    """A second evaluation reads the subset targets from the file instead of retraining."""
    train, test = lm.load_blocks(lm.QUICK.lm)
    cache = tmp_path / "truth.npz"
    first = lm.ground_truth(lm.QUICK, train, test, cache, progress=False)
    stamp = cache.stat().st_mtime_ns

    def no_retraining(*args, **kwargs):
        raise AssertionError("retrained although the ground truth was cached")

    monkeypatch.setattr(lm, "train", no_retraining)
    second = lm.ground_truth(lm.QUICK, train, test, cache, progress=False)
    assert cache.stat().st_mtime_ns == stamp
    for a, b in zip(first, second):
        assert (a == b).all()


def test_lm_targets_average_the_training_seeds(tmp_path, monkeypatch):
    """Each subset's target is minus the mean test loss over its train_seeds runs."""
    train, test = lm.load_blocks(lm.QUICK.lm)
    seen = []

    def fake_train(cfg, data, *, order_seed):
        seen.append(order_seed)
        return order_seed

    monkeypatch.setattr(lm, "train", fake_train)
    monkeypatch.setattr(lm, "evaluate", lambda seed, blocks: lm.torch.full((len(blocks),), float(seed)))
    _, targets = lm.ground_truth(lm.QUICK, train, test, tmp_path / "t.npz", progress=False)
    runs = lm.QUICK.train_seeds
    assert seen == list(range(lm.QUICK.n_subsets * runs))
    for s in range(lm.QUICK.n_subsets):
        assert targets[s, 0] == pytest.approx(-(s * runs + (runs - 1) / 2))
