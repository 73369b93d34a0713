"""Data in every form: each form gives the same features as plain columns, ambiguous forms are
refused with the rule, and a read-once iterable resumes a killed cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import grass
from grass.batches import Source, pad_rows
from grass.tasks import CausalLM
from tiny_models import causal_lm, padded

N, BATCH = 10, 4


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g)


def _loss(model, batch):
    x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
    return F.cross_entropy(model(x), y, reduction="none")


def _attr(**kw):
    return grass.Attributor(_model(), _loss, grass.SJLT(k=8), batch_size=BATCH, progress=False,
                            **kw)


class _Pairs(IterableDataset):
    """Yields (x, y) batches of 3 rows."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        for i in range(0, len(self.x), 3):
            yield self.x[i:i + 3], self.y[i:i + 3]


class _Examples(IterableDataset):
    """Yields single examples (x (5,), y ()), as most iterable datasets do."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        yield from zip(self.x, self.y)


class _Rows(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def _forms():
    x, y = _data()
    chunks = [(x[i:i + 3], y[i:i + 3]) for i in range(0, N, 3)]
    return {
        "columns tuple": (x, y),
        "columns dict": {"x": x, "y": y},
        "list of tuple batches": chunks,
        "list of dict batches": [{"x": a, "y": b} for a, b in chunks],
        "tuple of list batches": tuple([a, b] for a, b in chunks),
        "generator": (c for c in chunks),
        "IterableDataset": _Pairs(x, y),
        "DataLoader over IterableDataset": DataLoader(_Examples(x, y), batch_size=3),
        "DataLoader": DataLoader(TensorDataset(x, y), batch_size=3),
        "map-style Dataset": TensorDataset(x, y),
        "Dataset of dicts": _Rows(x, y),
    }


@pytest.mark.parametrize("form", sorted(_forms()))
def test_every_form_gives_the_features_of_columns(form):
    want = _attr().features(_data()).values
    got = _attr().features(_forms()[form]).values
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["list of dict batches", "generator", "IterableDataset",
                                  "DataLoader over IterableDataset"])
def test_cache_and_scores_from_batches(form):
    attr, ref = _attr(), _attr()
    ref.cache(_data())
    attr.cache(_forms()[form])
    assert attr.store.n_rows == N
    torch.testing.assert_close(attr.attribute(_data()), ref.attribute(_data()), rtol=1e-4,
                               atol=1e-5)


def test_hf_dataset_is_padded_in_order():
    from datasets import Dataset as HFDataset

    model = causal_lm("gpt2")
    lengths = [5, 9, 3, 7, 4, 8]
    rows = padded(lengths, seed=2)
    ids = [rows["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)]
    ds = HFDataset.from_dict({"input_ids": ids, "text": [f"doc {i}" for i in range(len(ids))]})
    kw = dict(batch_size=4, progress=False)
    from_hf = grass.Attributor(model, CausalLM(), grass.SJLT(k=16), **kw).features(ds).values
    one_by_one = torch.cat([
        grass.Attributor(model, CausalLM(), grass.SJLT(k=16), **kw).features(
            {"input_ids": torch.tensor([row]), "attention_mask": torch.ones(1, len(row))}).values
        for row in ids])
    torch.testing.assert_close(from_hf, one_by_one, rtol=1e-4, atol=1e-5)


def test_pad_rows():
    batch = pad_rows({"input_ids": [[1, 2, 3], [4]], "labels": [[1, 2, 3], [4]],
                      "label": [0, 1], "text": ["a", "b"]}, pad_values={"input_ids": 9})
    assert sorted(batch) == ["attention_mask", "input_ids", "label", "labels"]
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["label"].tolist() == [0, 1]


def test_ambiguous_and_bad_forms_are_refused():
    x, y = _data()
    with pytest.raises(ValueError, match=r"share their first dimension.*\[\(x0,\)"):
        Source([x[:3], x[3:]], BATCH, "train_data")
    with pytest.raises(TypeError, match="either tensors .columns. or batches"):
        Source([x, (x, y)], BATCH, "train_data")
    with pytest.raises(ValueError, match=r"single example.*DataLoader\(data, batch_size"):
        _attr().features(_Examples(x, y))
    with pytest.raises(ValueError, match="shuffle=False"):
        Source(DataLoader(TensorDataset(x, y), shuffle=True), BATCH, "train_data")
    with pytest.raises(TypeError, match="train_data must hold tensors or batches"):
        Source("some text", BATCH, "train_data")
    with pytest.raises(TypeError, match="got int"):
        Source(3, BATCH, "train_data")
    with pytest.raises(ValueError, match="empty"):
        Source(x[:0], BATCH, "train_data")


def test_read_once_iterable_is_read_once(tmp_path):
    x, y = _data()
    source = Source((c for c in [(x, y)]), BATCH, "data")
    assert source.n is None
    assert len(list(source.batches())) == 1
    with pytest.raises(RuntimeError, match="read only once"):
        list(source.batches())
    with pytest.raises(ValueError, match="n_rows"):
        _attr(store=tmp_path / "s").cache(c for c in [(x, y)])
    with pytest.raises(ValueError, match="yielded 10 rows, expected 12"):
        _attr(store=tmp_path / "t").cache((c for c in [(x, y)]), n_rows=12)


def test_generator_resumes_a_killed_cache(tmp_path):
    x, y = _data()

    def chunks():
        for i in range(0, N, 2):
            yield x[i:i + 2], y[i:i + 2]

    whole = _attr(store=tmp_path / "whole")
    whole.cache(chunks(), n_rows=N)

    calls = []

    def dies_after_two(model, batch):
        calls.append(batch[0].shape[0])
        if len(calls) > 2:
            raise KeyboardInterrupt("killed")
        return _loss(model, batch)

    killed = grass.Attributor(_model(), dies_after_two, grass.SJLT(k=8), progress=False,
                              store=tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        killed.cache(chunks(), n_rows=N)
    assert killed.store is None
    # The rerun reads a fresh generator from the start and needs no n_rows: the store has it.
    seen = []

    def counting(model, batch):
        seen.append(batch[0].shape[0])
        return _loss(model, batch)

    resumed = grass.Attributor(_model(), counting, grass.SJLT(k=8), progress=False,
                               store=tmp_path / "resumed")
    resumed.cache(chunks())
    assert sum(seen) == N - 4  # only the 3 batches not stored before the kill
    assert (tmp_path / "whole" / "rows.bin").read_bytes() == \
        (tmp_path / "resumed" / "rows.bin").read_bytes()
