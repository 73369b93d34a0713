"""Exhaustive scoring: cosine against brute-force normalised scores, train norms kept with the
store and reused (counted reads of the rows), the read-ahead reader, 16-bit stores, and the CUDA
staging path where a GPU is present."""

from __future__ import annotations

import struct
import threading
import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import grass
from grass import curvature, scoring
from grass.curvature import Preconditioner
from grass.scoring import Scorer, TrainNorms, read_ahead
from grass.store import ChecksumError, GradientStore

from conftest import rel_err

LAYERS = {"a": 6, "b": 5}


@pytest.fixture(autouse=True)
def chunks_of_chunk_size(monkeypatch):
    """Chunks of exactly ``chunk_size`` rows (no CHUNK_BYTES floor): these small stores then
    span several chunks."""
    monkeypatch.setattr(scoring, "CHUNK_BYTES", 0)


def _store(path, n=37, dtype=torch.float32, seed=0):
    store = GradientStore.open(path, config={"test": "scoring"}, n_rows=n, layers=LAYERS,
                               dtype=dtype, block_rows=4)
    g = torch.Generator().manual_seed(seed)
    store.write(0, torch.randn(n, sum(LAYERS.values()), generator=g))
    return store


def _brute(rows, test, damping):
    """Per-layer scores (L, n_test, n), test and train quadratic forms (L, n_test), (L, n),
    in fp64 with explicit inverses of the damped per-layer Fisher."""
    rows, test = rows.double(), test.double()
    scores, q_test, q_train, col = [], [], [], 0
    for k in LAYERS.values():
        a, b = rows[:, col:col + k], test[:, col:col + k]
        fim = a.T @ a / len(a)
        inv = torch.linalg.inv(fim + damping * fim.trace() / k * torch.eye(k, dtype=torch.float64))
        scores.append(b @ inv @ a.T)
        q_test.append(((b @ inv) * b).sum(1))
        q_train.append(((a @ inv) * a).sum(1))
        col += k
    return torch.stack(scores), torch.stack(q_test), torch.stack(q_train)


def _scorer(store, damping=0.3, chunk_size=5, norms=True):
    fishers = {name: s / store.n_rows
               for name, s in curvature.fisher_sums(store, (0, store.n_rows)).items()}
    pre = Preconditioner.efim(fishers, store.layout, damping)
    kept = TrainNorms(store, "efim", (damping, 0.0)) if norms else None
    return Scorer(store, pre, chunk_size, norms=kept)


class _CountReads:
    """Counts the rows that GradientStore.read / read_raw / read_mapped hand out (every access
    to rows.bin)."""

    def __init__(self, monkeypatch):
        self.rows = 0
        lock = threading.Lock()
        for name in ("read", "read_raw", "read_mapped"):
            original = getattr(GradientStore, name)

            def counted(store, start, stop, *args, _original=original, **kwargs):
                with lock:
                    self.rows += stop - start
                return _original(store, start, stop, *args, **kwargs)

            monkeypatch.setattr(GradientStore, name, counted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cosine_equals_brute_force(tmp_path, dtype):
    store = _store(tmp_path / "s", dtype=dtype)
    rows = store.read(0, store.n_rows)  # the stored (rounded) values, as fp32
    test = torch.randn(4, store.width, generator=torch.Generator().manual_seed(5))
    layers, q_test, q_train = _brute(rows, test, 0.3)
    scorer = _scorer(store)
    total = layers.sum(0)
    cos = total / (q_test.sum(0)[:, None] * q_train.sum(0)[None]).sqrt()
    assert rel_err(scorer.scores(test), total) < 1e-5
    assert rel_err(scorer.scores(test, cosine=True), cos) < 1e-5
    cos_layers = layers / (q_test[:, :, None] * q_train[:, None, :]).sqrt()
    assert rel_err(scorer.scores(test, per_layer=True, cosine=True), cos_layers) < 1e-5
    assert rel_err(scorer.self_influence(), q_train.sum(0)) < 1e-5
    assert rel_err(scorer.self_influence(per_layer=True), q_train) < 1e-5
    values, indices = scorer.top_k(test, 6, cosine=True)
    ref = cos.topk(6, dim=1)
    assert torch.equal(indices, ref.indices) and rel_err(values, ref.values) < 1e-5
    assert cos.abs().max() <= 1 + 1e-6


@pytest.mark.parametrize("small_batch", [16, 2])
@pytest.mark.parametrize("in_memory", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scores_in_tiles_from_the_map_equal_brute_force(tmp_path, monkeypatch, dtype, in_memory,
                                                         small_batch):
    """5 test rows against chunks of 16 rows over 37: as a small batch, tiles of 3 rows in one
    thread (full and partial tiles and chunks); as a large one (SMALL_BATCH 2), each chunk one
    tile. 16-bit tiles widened into a buffer, fp32 ones used in place: plain, per-layer and
    top-k scores equal the fp64 brute force over the stored values, and the thread count is
    restored."""
    monkeypatch.setattr(scoring, "TILE_BYTES", 3 * sum(LAYERS.values()) * 4)
    monkeypatch.setattr(scoring, "SMALL_BATCH", small_batch)
    store = _store(None if in_memory else tmp_path / "s", dtype=dtype)
    rows = store.read(0, store.n_rows)
    test = torch.randn(5, store.width, generator=torch.Generator().manual_seed(7))
    layers = _brute(rows, test, 0.3)[0]
    scorer = _scorer(store, chunk_size=16, norms=False)
    products = scoring._ChunkProducts(test, store.layout, False, dtype, 16)
    assert products.tile_rows == (3 if small_batch == 16 else 16)
    assert (products.buffer is None) == (dtype == torch.float32)
    threads = torch.get_num_threads()
    assert rel_err(scorer.scores(test), layers.sum(0)) < 1e-5
    assert rel_err(scorer.scores(test, per_layer=True), layers) < 1e-5
    values, indices = scorer.top_k(test, 4)
    ref = layers.sum(0).topk(4, dim=1)
    assert torch.equal(indices, ref.indices) and rel_err(values, ref.values) < 1e-5
    plain = Scorer(store, Preconditioner.identity(store.layout), 16)
    assert rel_err(plain.scores(test), test.double() @ rows.double().T) < 1e-5
    assert torch.get_num_threads() == threads


def test_cpu_chunks_hold_at_least_chunk_bytes(tmp_path, monkeypatch):
    """chunk_size 4 under a CHUNK_BYTES of 10 rows: the store is read in chunks of 10 rows,
    each asked ahead of its turn, and the scores stay the same."""
    store = _store(tmp_path / "s")
    test = torch.randn(2, store.width, generator=torch.Generator().manual_seed(8))
    expected = _scorer(store, chunk_size=4, norms=False).scores(test)
    monkeypatch.setattr(scoring, "CHUNK_BYTES", 10 * store.width * 4)
    reads, asked = [], []
    read_mapped, prefetch = GradientStore.read_mapped, GradientStore.prefetch
    monkeypatch.setattr(GradientStore, "read_mapped",
                        lambda s, a, b: reads.append((a, b)) or read_mapped(s, a, b))
    monkeypatch.setattr(GradientStore, "prefetch",
                        lambda s, a, b: asked.append((a, b)) or prefetch(s, a, b))
    scores = _scorer(store, chunk_size=4, norms=False).scores(test)
    assert reads == [(0, 10), (10, 20), (20, 30), (30, 37)]
    assert asked[:len(reads)] == [(0, 10), (10, 20), (20, 30), (30, 37)]
    assert rel_err(scores, expected) < 1e-6  # the GEMM's rounding may differ with the chunk


def test_read_mapped_is_a_checked_view_of_the_file(tmp_path):
    """read_mapped hands out the mapped pages themselves (a byte changed in rows.bin shows
    through), refuses rows not yet written, and a store opened after the change refuses the
    damaged block, naming its rows."""
    path = tmp_path / "s"
    store = GradientStore.open(path, config={"test": "scoring"}, n_rows=12, layers=LAYERS,
                               block_rows=4)
    store.write(0, torch.randn(8, store.width, generator=torch.Generator().manual_seed(4)))
    view = store.read_mapped(4, 8)
    assert view.dtype == torch.float32 and torch.equal(view, store.read(4, 8))
    with pytest.raises(ValueError, match=r"rows \[4, 12\) are not all written yet"):
        store.read_mapped(4, 12)
    offset = 5 * store.width * 4  # the first value of row 5
    assert float(view[1, 0]) != 12.5  # a standard normal draw
    with open(path / "rows.bin", "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<f", 12.5))
    assert float(view[1, 0]) == 12.5
    store.prefetch(0, 12)  # an advice only: the rows stay as they are
    assert float(view[1, 0]) == 12.5
    with pytest.raises(ChecksumError, match=r"rows \[4, 8\) of .* fail their checksum"):
        GradientStore.load(path).read_mapped(0, 8)


def test_norms_computed_once_saved_and_reused(tmp_path, monkeypatch):
    """A store without norms asked for cosine computes them in one pass and saves them; a
    second Scorer reads them back (no extra pass); another damping recomputes them."""
    store = _store(tmp_path / "s")
    test = torch.randn(3, store.width, generator=torch.Generator().manual_seed(2))
    expected = _scorer(store, norms=False).scores(test, cosine=True)
    reads = _CountReads(monkeypatch)
    n = store.n_rows
    first = _scorer(store)
    reads.rows = 0
    assert not store.has_array("efim.norms_rows")
    torch.testing.assert_close(first.scores(test, cosine=True), expected, rtol=0, atol=0)
    assert reads.rows == 2 * n  # one pass for the norms, one for the scores
    assert int(store.load_array("efim.norms_rows")) == n
    reads.rows = 0
    torch.testing.assert_close(first.scores(test, cosine=True), expected, rtol=0, atol=0)
    assert reads.rows == n  # norms kept in the Scorer: one GEMM pass only

    reopened = GradientStore.load(tmp_path / "s")
    second = _scorer(reopened)
    reads.rows = 0
    torch.testing.assert_close(second.self_influence(), first.self_influence(), rtol=0, atol=0)
    assert reads.rows == 0  # read from the store's arrays
    torch.testing.assert_close(second.scores(test, cosine=True), expected, rtol=0, atol=0)
    assert reads.rows == n

    other = _scorer(reopened, damping=0.9)
    reads.rows = 0
    q = other.self_influence(per_layer=True)
    assert reads.rows == n  # saved under damping 0.3: recomputed for 0.9, and replaced
    assert rel_err(q, _brute(store.read(0, n), test, 0.9)[2]) < 1e-5
    torch.testing.assert_close(store.load_array("efim.norms_damping"),
                               torch.tensor([0.9, 0.0], dtype=torch.float64))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(9, 6), nn.Tanh(), nn.Linear(6, 5, bias=False))


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def test_second_attributor_reads_no_rows_to_build_curvature_or_norms(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(1)
    train = (torch.randn(41, 9, generator=g), torch.randint(0, 5, (41,), generator=g))
    test = (torch.randn(3, 9, generator=g), torch.randint(0, 5, (3,), generator=g))
    path = tmp_path / "index"
    first = grass.Attributor(_model(), _loss, grass.FactGraSS(k=8), store=path, damping=0.3,
                             chunk_size=10, batch_size=8, progress=False)
    first.cache(train)
    test_features = first.features(test)
    cos = first.attribute(test_features, cosine=True)
    influence = first.self_influence()

    reads = _CountReads(monkeypatch)
    second = grass.Attributor.load(path, _model(), _loss, chunk_size=10, progress=False)
    assert second.hessian == "efim" and second.damping == 0.3
    torch.testing.assert_close(second.self_influence(), influence, rtol=0, atol=0)
    assert reads.rows == 0  # neither the curvature nor the norms read rows.bin
    torch.testing.assert_close(second.attribute(test_features, cosine=True), cos, rtol=0, atol=0)
    assert reads.rows == 41  # the scoring pass itself, once

    # A rerun of cache over the finished store computes nothing and reads no rows either.
    third = grass.Attributor(_model(), _loss, grass.FactGraSS(k=8), store=path, damping=0.3,
                             chunk_size=10, batch_size=8, progress=False)
    reads.rows = 0
    third.cache(train)
    torch.testing.assert_close(third.self_influence(), influence, rtol=0, atol=0)
    assert reads.rows == 0


def test_read_ahead_yields_in_order_and_raises_at_the_failing_chunk():
    seen = []

    def read(a, b, slot):
        if a == 20:
            raise OSError("disk gone at 20")
        return torch.arange(a, b)

    chunks = read_ahead(read, 0, 33, 5)
    with pytest.raises(OSError, match="disk gone at 20"):
        for a, b, rows in chunks:
            assert torch.equal(rows, torch.arange(a, b))
            seen.append((a, b))
    assert seen == [(0, 5), (5, 10), (10, 15), (15, 20)]
    full = [(a, b) for a, b, _ in read_ahead(lambda a, b, slot: torch.zeros(b - a), 3, 33, 7)]
    assert full == [(3, 10), (10, 17), (17, 24), (24, 31), (31, 33)]


def test_read_ahead_stops_its_reader_when_closed_early():
    calls = []

    def read(a, b, slot):
        calls.append(a)
        return torch.zeros(1)

    chunks = read_ahead(read, 0, 10_000, 1, depth=2)
    next(chunks)
    chunks.close()  # joins the reader thread
    assert not any(t.name == "grass-read-ahead" for t in threading.enumerate())
    assert len(calls) <= 4  # the consumed chunk, the queue's depth and one blocked put


def test_read_ahead_never_overwrites_the_chunk_in_use():
    """Reused buffers, one per slot: while the consumer dawdles over a chunk, the reader runs
    ahead as far as it can, yet the chunk in hand keeps its values."""
    depth = 2
    buffers = [torch.empty(3) for _ in range(depth + 2)]
    slots = []

    def read(a, b, slot):
        slots.append(slot)
        return buffers[slot].fill_(a)

    for a, b, rows in read_ahead(read, 0, 60, 3, depth=depth):
        time.sleep(0.01)  # the reader fills every free slot meanwhile
        assert torch.equal(rows, torch.full((3,), float(a)))
    assert slots == [i % (depth + 2) for i in range(20)]


@pytest.mark.parametrize("in_memory", [False, True])
def test_read_raw_into_a_buffer(tmp_path, in_memory):
    store = _store(None if in_memory else tmp_path / "s", dtype=torch.float16)
    out = torch.full((10, store.width), float("nan"), dtype=torch.float16)
    got = store.read_raw(2, 7, out=out)
    assert got.data_ptr() == out.data_ptr() and got.shape == (5, store.width)
    assert torch.equal(got.float(), store.read(2, 7)) and out[5:].isnan().all()
    with pytest.raises(ValueError, match="out must be a contiguous torch.float16 tensor"):
        store.read_raw(0, 11, out=out)
    with pytest.raises(ValueError, match="out must be"):
        store.read_raw(0, 5, out=out.float())


def test_read_raw_keeps_the_store_dtype(tmp_path):
    store = _store(tmp_path / "s", dtype=torch.bfloat16)
    raw = store.read_raw(3, 9)
    assert raw.dtype == torch.bfloat16 and raw.shape == (6, store.width)
    assert torch.equal(raw.float(), store.read(3, 9))
    with pytest.raises(ValueError, match="start < stop"):
        store.read_raw(5, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the pinned "
                    "staging path runs only when test features are on a GPU)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_scoring_equals_cpu(tmp_path, dtype):
    store = _store(tmp_path / "s", n=301, dtype=dtype)
    test = torch.randn(7, store.width, generator=torch.Generator().manual_seed(3))
    scorer = _scorer(store, chunk_size=16)
    cpu = scorer.scores(test, cosine=True)
    gpu = scorer.scores(test.cuda(), cosine=True)
    assert gpu.device.type == "cpu" and rel_err(gpu, cpu) < 1e-5
    values, indices = scorer.top_k(test.cuda(), 5)
    assert torch.equal(indices, scorer.top_k(test, 5)[1])
