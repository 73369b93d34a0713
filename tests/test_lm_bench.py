"""Smoke test of the language-model benchmark (bench/lm.py --quick): the whole pipeline runs
(data, training, subset retraining with its on-disk ground truth, attribution with every
method, LDS, outputs) and produces finite numbers."""

import json
import math

import pytest

lm = pytest.importorskip("bench.lm")


def test_lm_quick_runs_and_writes_finite_results(tmp_path):
    rows = lm.run(lm.QUICK, tmp_path, progress=False)

    assert [r["method"].split()[0] for r in rows] == [m[0].split()[0] for m in lm.methods(lm.QUICK.k)]
    for row in rows:
        assert math.isfinite(row["LDS"]) and -1 <= row["LDS"] <= 1, row
        assert row["cache tokens/s"] > 0 and math.isfinite(row["cache / train step"]), row
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
