"""A store that repairs itself: damaged blocks and a writer whose progress record is lost are
reported (rows and writer), scoring refuses naming them, and the next cache recomputes just
those rows, ending bit-identical to the undamaged store."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import grass
from grass.store import ChecksumError, GradientStore
from grass.store_repair import find_damage

N, BLOCK_ROWS, BATCH = 41, 4, 4


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(9, 6), nn.Tanh(), nn.Linear(6, 5, bias=False))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 9, generator=g), torch.randint(0, 5, (n,), generator=g)


class _CountingLoss:
    """The loss, counting the examples it is evaluated on (the rows a cache computes)."""

    def __init__(self):
        self.rows = 0

    def __call__(self, model, batch):
        self.rows += len(batch[0])
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _attr(path, loss=None):
    return grass.Attributor(_model(), loss or _CountingLoss(), grass.FactGraSS(k=8), store=path,
                            batch_size=BATCH, chunk_size=8, progress=False)


def _new_store(path, writer="main"):
    """The store an Attributor would create, with small checksum blocks (several per store)."""
    attr = _attr(None)
    return GradientStore.open(path, config=attr.config, n_rows=N, layers=attr.layers.layout,
                              block_rows=BLOCK_ROWS, writer=writer)


def _flip(path, row: int, width_bytes: int) -> None:
    with open(path, "r+b") as f:
        f.seek(row * width_bytes + 3)
        byte = f.read(1)
        f.seek(row * width_bytes + 3)
        f.write(bytes([byte[0] ^ 0x10]))


def _bytes(path):
    return (path / "rows.bin").read_bytes()


@pytest.fixture
def train_test():
    return _data(N, 1), _data(3, 2)


def test_flipped_blocks_are_named_refused_and_recomputed_bit_identical(tmp_path, train_test):
    train, test = train_test
    clean, bad = tmp_path / "clean", tmp_path / "bad"
    _new_store(clean)
    first = _attr(clean)
    first.cache(train)
    features = first.features(test)
    scores = first.attribute(features)
    shutil.copytree(clean, bad)
    assert find_damage(bad) == []

    row_bytes = first.store.width * 4
    for row in (1, 13, 30):  # blocks [0, 4), [12, 16), [28, 32)
        _flip(bad / "rows.bin", row, row_bytes)
    damage = find_damage(bad)
    assert [(d.writer, d.start, d.stop) for d in damage] == [
        ("main", 0, 4), ("main", 12, 16), ("main", 28, 32)]

    loaded = grass.Attributor.load(bad, _model(), _CountingLoss(), progress=False)
    with pytest.raises(ChecksumError, match=r"rows \[0, 4\) of writer 'main'.*"
                       r"rows \[12, 16\) of writer 'main'.*rows \[28, 32\) of writer 'main'"):
        loaded.attribute(features)
    with pytest.raises(ChecksumError, match="Attributor.cache"):
        loaded.self_influence()

    loss = _CountingLoss()
    repairing = _attr(bad, loss)
    with pytest.warns(RuntimeWarning, match=r"damaged rows, which are recomputed: rows \[0, 4\) "
                      r"of writer 'main' \(checksum mismatch\)"):
        repairing.cache(train)
    assert loss.rows == 12  # just the three damaged blocks
    assert _bytes(bad) == _bytes(clean)
    assert find_damage(bad) == []
    torch.testing.assert_close(repairing.attribute(features), scores, rtol=0, atol=0)


def test_lost_progress_record_and_flipped_blocks_recomputed_bit_identical(tmp_path, train_test):
    """Two writers ('rank1' wrote rows [20, 41), 'main' the rest); rank1's record is truncated
    and a block of main's rows is damaged."""
    train, test = train_test
    clean, bad = tmp_path / "clean", tmp_path / "bad"
    values = _attr(None).features(train).values
    _new_store(clean, writer="rank1").write(20, values[20:])
    first = _attr(clean)
    first.cache(train)
    assert torch.equal(first.store.read(0, N), values)
    scores = first.attribute(first.features(test))
    shutil.copytree(clean, bad)

    record = bad / "progress" / "rank1.json"
    record.write_bytes(record.read_bytes()[:9])
    _flip(bad / "rows.bin", 6, first.store.width * 4)
    damage = find_damage(bad)
    assert [(d.writer, d.start, d.stop) for d in damage] == [("main", 4, 8), ("rank1", None, None)]
    assert "rank1.json is corrupted" in damage[1].reason
    with pytest.raises(ValueError, match="rank1.json is corrupted"):
        GradientStore.load(bad)  # a store with an unreadable record cannot be opened to score

    loss = _CountingLoss()
    repairing = _attr(bad, loss)
    with pytest.warns(RuntimeWarning, match=r"all its rows of writer 'rank1'"):
        repairing.cache(train)
    assert loss.rows == 4 + 21  # main's damaged block and every row rank1 had recorded
    assert _bytes(bad) == _bytes(clean)
    assert not (bad / "progress" / "rank1.json").exists()
    assert find_damage(bad) == []
    torch.testing.assert_close(repairing.attribute(repairing.features(test)), scores,
                               rtol=0, atol=0)


def test_truncated_checksum_table_makes_the_writer_damaged(tmp_path, train_test):
    train, _ = train_test
    _new_store(tmp_path / "s")
    _attr(tmp_path / "s").cache(train)
    table = tmp_path / "s" / "checksums" / "main.crc"
    table.write_bytes(table.read_bytes()[:20])
    damage = find_damage(tmp_path / "s")
    assert len(damage) == 1 and damage[0].start is None and "truncated" in damage[0].reason
    loss = _CountingLoss()
    with pytest.warns(RuntimeWarning, match="main.crc is truncated"):
        _attr(tmp_path / "s", loss).cache(train)
    assert loss.rows == N and find_damage(tmp_path / "s") == []


def test_cache_without_verify_leaves_damage_for_scoring_to_refuse(tmp_path, train_test):
    train, test = train_test
    _new_store(tmp_path / "s")
    attr = _attr(tmp_path / "s")
    attr.cache(train)
    _flip(tmp_path / "s" / "rows.bin", 17, attr.store.width * 4)
    again = _attr(tmp_path / "s")
    again.cache(train, verify=False)  # no checksum pass: nothing found, nothing recomputed
    with pytest.raises(ChecksumError, match=r"rows \[16, 20\) of writer 'main'"):
        again.attribute(test)
