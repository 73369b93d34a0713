"""An index that reopens: the curvature is computed once and kept with the store, and
Attributor.load scores in a new process without the training data, refusing what differs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import grass
from grass import curvature, distributed

N = 24


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _data(n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _built(path, **kw):
    attr = grass.Attributor(_model(), _loss, grass.SJLT(k=8), store=path, batch_size=5,
                            progress=False, damping=kw.pop("damping", 0.3), **kw)
    attr.cache(_data())
    return attr


def _snapshot(path):
    return {os.path.join(d, f): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(path) for f in files}


def _kill_after(n_batches, path):
    """Start a cache into ``path`` that is killed on its batch ``n_batches + 1``."""
    calls = []

    def dies(model, batch):
        calls.append(1)
        if len(calls) > n_batches:
            raise KeyboardInterrupt
        return _loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        grass.Attributor(_model(), dies, grass.SJLT(k=8), store=path, batch_size=5,
                         progress=False, damping=0.3).cache(_data())


def _no_fisher(*args, **kwargs):
    raise AssertionError("the Fisher was recomputed from the store's rows")


def test_curvature_is_saved_once_and_reused(tmp_path, monkeypatch):
    first = _built(tmp_path / "idx")
    saved = curvature.load_fisher(first.store, "efim")
    assert saved is not None and set(saved) == set(first.store.layout)
    assert curvature.saved_damping(first.store, "efim") == (0.3, 0.0)
    ref = first.store.read(0, N)
    for name, columns in first.store.layout.items():
        block = ref[:, columns.cols]
        torch.testing.assert_close(saved[name], block.T @ block / N, rtol=1e-5, atol=1e-7)
    monkeypatch.setattr(distributed, "fisher", _no_fisher)
    monkeypatch.setattr(curvature, "fisher_sums", _no_fisher)
    again = _built(tmp_path / "idx")
    test = _data(4, seed=7)
    torch.testing.assert_close(again.attribute(test), first.attribute(test))
    loaded = grass.Attributor.load(tmp_path / "idx", _model(), _loss, progress=False)
    assert loaded.hessian == "efim" and loaded.damping == 0.3
    torch.testing.assert_close(loaded.attribute(test), first.attribute(test))
    other = grass.Attributor.load(tmp_path / "idx", _model(), _loss, damping=2.0, progress=False)
    assert not torch.allclose(other.attribute(test), first.attribute(test))


def test_fisher_larger_than_its_rows_is_rebuilt_from_them(tmp_path):
    attr = grass.Attributor(_model(), _loss, grass.SJLT(k=8), store=tmp_path / "idx",
                            progress=False)
    attr.cache(_data(6))  # 6 rows, both layers compressed to k = 8 > 6
    arrays = sorted(os.listdir(tmp_path / "idx" / "arrays"))
    assert "efim.0.bin" not in arrays and "efim.2.bin" not in arrays and "efim.rows.bin" in arrays
    test = _data(3, seed=8)
    loaded = grass.Attributor.load(tmp_path / "idx", _model(), _loss, progress=False)
    torch.testing.assert_close(loaded.attribute(test), attr.attribute(test))
    rows = attr.store.read(0, 6)
    for name, columns in attr.store.layout.items():
        block = rows[:, columns.cols]
        torch.testing.assert_close(loaded._fishers[name], block.T @ block / 6)


def test_resumed_store_has_the_same_curvature(tmp_path):
    _built(tmp_path / "whole")
    _kill_after(2, tmp_path / "resumed")
    _built(tmp_path / "resumed")
    whole, resumed = _snapshot(tmp_path / "whole"), _snapshot(tmp_path / "resumed")
    for name in ("rows.bin", *sorted(os.listdir(tmp_path / "whole" / "arrays"))):
        key = name if name == "rows.bin" else os.path.join("arrays", name)
        assert whole[str(tmp_path / "whole" / key)] == resumed[str(tmp_path / "resumed" / key)]


def test_load_in_a_new_process_scores_as_in_process(tmp_path):
    attr = _built(tmp_path / "idx")
    test = _data(5, seed=9)
    torch.save({"want": attr.attribute(test), "test": test}, tmp_path / "want.pt")
    script = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(__file__)!r})
import grass
from grass import curvature, distributed
from test_index import _model, _loss, _no_fisher
distributed.fisher = curvature.fisher_sums = _no_fisher
saved = torch.load({str(tmp_path / 'want.pt')!r})
attr = grass.Attributor.load({str(tmp_path / 'idx')!r}, _model(), _loss, progress=False)
got = attr.attribute(saved["test"])
torch.testing.assert_close(got, saved["want"], rtol=1e-5, atol=1e-6)
print("OK", tuple(got.shape))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "OK (5, 24)" in out.stdout


def test_load_refuses_what_differs_and_writes_nothing(tmp_path):
    _built(tmp_path / "idx")
    before = _snapshot(tmp_path / "idx")
    with pytest.raises(ValueError, match="weights differ"):
        grass.Attributor.load(tmp_path / "idx", _model(seed=5), _loss)
    wider = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))
    with pytest.raises(ValueError, match="layers: index has"):
        grass.Attributor.load(tmp_path / "idx", wider, _loss)
    with pytest.raises(ValueError, match="compressor: index has"):
        grass.Attributor.load(tmp_path / "idx", _model(), _loss, compressor=grass.SJLT(k=4))
    with pytest.raises(ValueError, match="no grass index"):
        grass.Attributor.load(tmp_path / "absent", _model(), _loss)
    assert _snapshot(tmp_path / "idx") == before
    assert not (tmp_path / "absent").exists()


def test_load_refuses_an_incomplete_index(tmp_path):
    _kill_after(1, tmp_path / "idx")
    with pytest.raises(ValueError, match=r"incomplete \(rows \[\(5, 24\)\] missing\)"):
        grass.Attributor.load(tmp_path / "idx", _model(), _loss)


def test_trained_masks_need_the_compressor(tmp_path):
    masks = {"0": (torch.arange(4), torch.arange(3)), "2": (torch.arange(3), torch.arange(2))}
    compressor = grass.FactGraSS(k=4, blowup=1, masks=masks)
    attr = grass.Attributor(_model(), _loss, compressor, store=tmp_path / "idx", progress=False)
    attr.cache(_data())
    with pytest.raises(ValueError, match="pass the compressor with its tables"):
        grass.Attributor.load(tmp_path / "idx", _model(), _loss)
    loaded = grass.Attributor.load(tmp_path / "idx", _model(), _loss, compressor=compressor,
                                   progress=False)
    torch.testing.assert_close(loaded.self_influence(), attr.self_influence())
