"""GradientStore on real files: round trips, kill-and-resume at every step of a write, bounded
progress records, writers that never share rows, refusal of mismatched or damaged stores."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from grass.store import GradientStore, StoreError

LAYERS = {"fc1": 5, "fc2.weight": 3}
CONFIG = {"compressor": {"name": "FactGraSS", "k": 8, "seed": 0}, "model": "mlp"}
N_ROWS = 42
BLOCK_ROWS = 6  # small checksum blocks, so that 4-row writes straddle and share blocks

# The caching job run in a child process: fills the store's missing rows in chunks of 4 (in
# row order, or last chunk first), each row a deterministic function of its index (as a real
# capture is of its example), and prints every chunk's start once write() returned. With a
# kill point it SIGKILLs itself at the nth call of one step inside write(); with a parity it
# writes only the even or odd chunks (two such writers fill one store together).
CHILD = textwrap.dedent(
    """
    import os, signal, sys, time, torch
    import grass.store_progress as progress
    from grass.store import GradientStore
    path, dtype, order, point, nth, writer, parity, delay = sys.argv[1:]
    nth, delay = int(nth), float(delay)
    # point -> (object, attribute, kill before the call (else after it))
    POINTS = dict(
        rows_flushed=(GradientStore, "_flush_rows", False),       # rows on disk, no checksum
        checksums_written=(progress.ChecksumTable, "put", False), # checksums, no record
        record_unrenamed=(os, "replace", True),                   # new record not yet renamed
        recorded=(progress, "write_atomic", False),               # recorded, claims not marked
    )
    if point != "none":
        owner, name, before = POINTS[point]
        original, calls = getattr(owner, name), [0]
        def killing(*args, **kw):
            calls[0] += 1
            if before and calls[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            out = original(*args, **kw)
            if not before and calls[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        setattr(owner, name, killing)
    store = GradientStore.open(path, config={config!r}, n_rows={n!r}, layers={layers!r},
                               dtype=getattr(torch, dtype), writer=writer)
    for lo, hi in store.missing():
        starts = [s for s in range(lo, hi, 4) if parity == "all" or (s // 4) % 2 == (parity == "odd")]
        for start in (starts[::-1] if order == "backward" else starts):
            stop = min(start + 4, hi)
            rows = torch.stack([torch.randn(store.width, generator=torch.Generator().manual_seed(1000 + i))
                                for i in range(start, stop)])
            store.write(start, rows)
            print(start, flush=True)
            time.sleep(delay)
    """
)


def _child(path, dtype="float32", order="forward", point="none", nth=0, writer="main",
           parity="all", delay=0.0) -> subprocess.Popen:
    code = CHILD.format(config=CONFIG, n=N_ROWS, layers=LAYERS)
    args = [str(path), dtype, order, point, str(nth), writer, parity, str(delay)]
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)


def _open(path, **kw):
    args = dict(config=CONFIG, n_rows=N_ROWS, layers=LAYERS, dtype=torch.float32, block_rows=BLOCK_ROWS)
    args.update(kw)
    return GradientStore.open(path, **args)


def _gaps(rows: set[int], n: int) -> list[tuple[int, int]]:
    """The ranges of [0, n) not in `rows` (the test's own reckoning, independent of the store)."""
    out = []
    for i in range(n):
        if i not in rows:
            if out and out[-1][1] == i:
                out[-1] = (out[-1][0], i + 1)
            else:
                out.append((i, i + 1))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("on_disk", [False, True])
def test_round_trip_layers_and_chunks(tmp_path, dtype, on_disk):
    store = _open(tmp_path / "s" if on_disk else None, dtype=dtype)
    assert store.width == 8
    assert {name: (c.start, c.stop) for name, c in store.layout.items()} == {
        "fc1": (0, 5), "fc2.weight": (5, 8)}
    rows = torch.randn(N_ROWS, 8)
    store.write(10, rows[10:30])
    assert store.missing() == [(0, 10), (30, N_ROWS)]
    with pytest.raises(ValueError, match="not all written"):
        store.read(0, 12)
    store.write(0, rows[:10])
    store.write(30, rows[30:])
    assert store.missing() == [] and store.complete
    expected = rows.to(dtype).float()
    assert torch.equal(store.read(0, N_ROWS), expected)
    assert torch.equal(store.read(3, 17, "fc2.weight"), expected[3:17, 5:8])
    got = list(store.chunks(16, layer="fc1"))
    assert [(a, b) for a, b, _ in got] == [(0, 16), (16, 32), (32, N_ROWS)]
    assert torch.equal(torch.cat([t for _, _, t in got]), expected[:, :5])
    if on_disk:  # a fresh process view: reopened from the manifest, memory-mapped
        again = _open(tmp_path / "s", dtype=dtype)
        assert again.missing() == [] and torch.equal(again.read(0, N_ROWS), expected)


@pytest.mark.parametrize("on_disk", [False, True])
def test_arrays_round_trip(tmp_path, on_disk):
    store = _open(tmp_path / "s" if on_disk else None)
    saved = {"mask": torch.rand(17) > 0.5, "idx": torch.randperm(9), "fim": torch.randn(4, 4),
             "half": torch.randn(3, 2).to(torch.bfloat16)}
    for name, t in saved.items():
        store.save_array(name, t)
    store.save_array("fim", saved["fim"] * 2)  # replaced, not appended
    reader = _open(tmp_path / "s") if on_disk else store
    for name, t in saved.items():
        got = reader.load_array(name)
        assert got.dtype == t.dtype and torch.equal(got, t * 2 if name == "fim" else t)
    with pytest.raises(KeyError, match="nope"):
        reader.load_array("nope")
    with pytest.raises(ValueError, match="name must match"):
        store.save_array("../evil", saved["fim"])


def test_mismatched_config_refused_naming_keys(tmp_path):
    _open(tmp_path / "s").write(0, torch.randn(2, 8))
    bad_config = {"compressor": {"name": "FactGraSS", "k": 16, "seed": 0}, "model": "mlp"}
    with pytest.raises(StoreError, match=r"config\.compressor\.k: store has 8, requested 16"):
        _open(tmp_path / "s", config=bad_config)
    with pytest.raises(ValueError, match="n_rows"):
        _open(tmp_path / "s", n_rows=N_ROWS + 1)
    with pytest.raises(ValueError, match="dtype: store has 'float32', requested 'float16'"):
        _open(tmp_path / "s", dtype=torch.float16)
    with pytest.raises(ValueError, match="layers"):
        _open(tmp_path / "s", layers={"fc1": 5, "fc2": 3})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        _open(tmp_path / "other")


def test_truncated_file_is_refused(tmp_path):
    store = _open(tmp_path / "s")
    store.write(0, torch.randn(N_ROWS, 8))
    rows = tmp_path / "s" / "rows.bin"
    os.truncate(rows, rows.stat().st_size - 4)
    with pytest.raises(StoreError, match="truncated"):
        _open(tmp_path / "s")


def _flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def test_flipped_byte_anywhere_in_a_coalesced_range_is_caught(tmp_path):
    store = _open(tmp_path / "s")
    for start in range(0, N_ROWS, 4):  # eleven writes that coalesce into one recorded range
        store.write(start, torch.randn(min(4, N_ROWS - start), 8))
    assert json.loads((tmp_path / "s" / "progress" / "main.json").read_text())["ranges"] == [[0, N_ROWS]]
    rows_bin, row_bytes = tmp_path / "s" / "rows.bin", 8 * 4
    # First byte, a block's first and last byte, a byte inside a write that straddles blocks
    # (rows 4..7 cross the block boundary at row 6), the last byte of the file.
    for offset in (0, 18 * row_bytes, 24 * row_bytes - 1, 7 * row_bytes + 5, N_ROWS * row_bytes - 1):
        _flip(rows_bin, offset)
        block = offset // row_bytes // BLOCK_ROWS
        lo, hi = block * BLOCK_ROWS, min((block + 1) * BLOCK_ROWS, N_ROWS)
        fresh = _open(tmp_path / "s")  # a new process view: nothing verified yet
        with pytest.raises(StoreError, match=rf"rows \[{lo}, {hi}\) of .*fail their checksum"):
            fresh.read(offset // row_bytes, offset // row_bytes + 1)
        with pytest.raises(StoreError, match="checksum"):
            list(fresh.chunks(16))
        others = [b for b in range(0, N_ROWS, BLOCK_ROWS) if b != lo]
        for b in others:  # the checksum localises the damage to its block
            assert fresh.read(b, min(b + BLOCK_ROWS, N_ROWS)).shape[0] > 0
        _flip(rows_bin, offset)  # undo
    assert _open(tmp_path / "s").read(0, N_ROWS).shape == (N_ROWS, 8)


def test_corrupted_manifest_and_array(tmp_path):
    store = _open(tmp_path / "s")
    store.save_array("mask", torch.arange(10))
    with open(tmp_path / "s" / "arrays" / "mask.bin", "r+b") as f:
        f.write(b"\x07")
    with pytest.raises(StoreError, match="'mask'.*checksum"):
        store.load_array("mask")
    (tmp_path / "s" / "manifest.json").write_text('{"version": 1, "conf')
    with pytest.raises(StoreError, match="manifest.json is corrupted"):
        _open(tmp_path / "s")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_rows must be a positive int"):
        _open(None, n_rows=0)
    with pytest.raises(ValueError, match="layers must"):
        _open(None, layers={})
    with pytest.raises(TypeError, match="dtype must be one of"):
        _open(None, dtype=torch.int32)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        _open(None, config={"f": object()})
    store = _open(None)
    with pytest.raises(ValueError, match=r"shape \(m >= 1, width=8\)"):
        store.write(0, torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"must lie in \[0, n_rows=42\)"):
        store.write(40, torch.randn(3, 8))
    with pytest.raises(TypeError, match="floating-point"):
        store.write(0, torch.ones(3, 8, dtype=torch.int64))
    bad = torch.randn(3, 8)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="row 6 is not"):
        store.write(5, bad)
    store.write(0, torch.randn(4, 8))
    with pytest.raises(ValueError, match="overlap"):
        store.write(2, torch.randn(4, 8))
    with pytest.raises(ValueError, match="layer must be one of"):
        store.read(0, 4, layer="fc3")
    with pytest.raises(ValueError, match="start < stop"):
        store.read(3, 3)


def test_load_reopens_with_the_manifest_configuration(tmp_path):
    rows = torch.randn(N_ROWS, 8)
    _open(tmp_path / "s", dtype=torch.float16).write(0, rows)
    store = GradientStore.load(tmp_path / "s")
    assert store.config == CONFIG and store.layout.sizes == LAYERS and store.dtype == torch.float16
    assert torch.equal(store.read(0, N_ROWS), rows.half().float())
    with pytest.raises(StoreError, match="no manifest.json"):
        GradientStore.load(tmp_path / "elsewhere")


# ----------------------------------------------------------------------------- kill and resume
@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """rows.bin of an uninterrupted run, per dtype."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        path = tmp_path_factory.mktemp("whole") / "s"
        _open(path, dtype=getattr(torch, dtype))
        assert _child(path, dtype).wait(timeout=120) == 0
        out[dtype] = (path / "rows.bin").read_bytes()
    return out


KILLS = [  # (point, order, dtype)
    ("rows_flushed", "forward", "bfloat16"),
    ("checksums_written", "forward", "float32"),
    ("checksums_written", "backward", "bfloat16"),
    ("record_unrenamed", "forward", "float32"),
    ("recorded", "forward", "bfloat16"),
]


@pytest.mark.parametrize("point, order, dtype", KILLS)
def test_sigkill_inside_write_resumes_bit_identical(tmp_path, whole_run, point, order, dtype):
    """SIGKILL at a named step of the third write; the record then holds two writes (three once
    the record is renamed), the recorded rows read back intact, and a resumed run that writes
    only the missing rows ends with the bytes of an uninterrupted run."""
    nth = 3
    _open(tmp_path / "s", dtype=getattr(torch, dtype))
    killed = _child(tmp_path / "s", dtype, order, point, nth)
    out, _ = killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    done = [int(s) for s in out.split()]
    assert len(done) == nth - 1  # the nth write never returned
    starts = list(range(0, N_ROWS, 4))
    starts = starts[::-1] if order == "backward" else starts
    recorded = starts[: nth if point == "recorded" else nth - 1]
    rows = {i for s in recorded for i in range(s, min(s + 4, N_ROWS))}
    store = _open(tmp_path / "s", dtype=getattr(torch, dtype))
    assert store.missing() == _gaps(rows, N_ROWS)
    for lo, hi in _gaps(set(range(N_ROWS)) - rows, N_ROWS):  # recorded rows pass their checksums
        store.read(lo, hi)

    resumed = _child(tmp_path / "s", dtype, order)
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0
    redone = [int(s) for s in out.split()]
    assert sorted(redone) == sorted(set(starts) - set(recorded)), "only the missing rows are redone"
    assert (tmp_path / "s" / "rows.bin").read_bytes() == whole_run[dtype]
    fresh = _open(tmp_path / "s", dtype=getattr(torch, dtype))
    assert fresh.missing() == []
    assert fresh.read(0, N_ROWS).shape == (N_ROWS, 8)  # every block checks out
    # Every recorded row is claimed again, also one recorded just before the kill.
    assert (tmp_path / "s" / "claimed.bin").read_bytes() == b"\x01" * N_ROWS


# ----------------------------------------------------------------------------- record size
def test_record_size_is_bounded_by_gaps_not_writes(tmp_path):
    n = 2400
    store = GradientStore.open(tmp_path / "s", config=CONFIG, n_rows=n, layers={"a": 2})
    record = tmp_path / "s" / "progress" / "main.json"
    for start in range(0, 2000):  # 2000 contiguous one-row writes
        store.write(start, torch.randn(1, 2))
    assert record.stat().st_size < 100, record.read_text()
    for start in range(2001, n, 2):  # 200 writes, each leaving a gap before it
        store.write(start, torch.randn(1, 2))
    gappy = json.loads(record.read_text())["ranges"]
    assert len(gappy) == 201 and record.stat().st_size < 201 * 16
    for start in range(2000, n, 2):  # fill the gaps: one range again
        store.write(start, torch.randn(1, 2))
    assert json.loads(record.read_text())["ranges"] == [[0, n]] and record.stat().st_size < 100
    assert GradientStore.load(tmp_path / "s").read(0, n).shape == (n, 2)


# ----------------------------------------------------------------------------- several writers
def test_writers_never_record_the_same_rows(tmp_path):
    a = _open(tmp_path / "s", writer="a")
    late = _open(tmp_path / "s", writer="late")  # its snapshot of the others is taken now
    a.write(0, torch.randn(8, 8))
    b = _open(tmp_path / "s", writer="b")
    with pytest.raises(ValueError, match=r"overlap rows \[4, 8\) already written by writer 'a'"):
        b.write(4, torch.randn(6, 8))
    # Rows recorded after `late` opened are found through the shared claims, not the snapshot.
    with pytest.raises(ValueError, match=r"overlap rows \[0, 3\) already written by writer 'a'"):
        late.write(0, torch.randn(3, 8))
    with pytest.raises(ValueError, match="already written by writer 'a'"):
        a.write(7, torch.randn(2, 8))
    b.write(8, torch.randn(4, 8))
    late.write(12, torch.randn(4, 8))
    assert a.missing() == [(16, N_ROWS)]
    # If two writers' records ever overlap, every reader says so instead of reading either.
    (tmp_path / "s" / "progress" / "c.json").write_text('{"version": 2, "ranges": [[10, 14]]}')
    with pytest.raises(StoreError, match=r"writers '(b|late)' and 'c' both recorded rows \[1[02], 1[24]\)"):
        a.missing()


def test_two_processes_fill_shared_blocks_while_a_reader_reads(tmp_path, whole_run):
    """Writers 'even' and 'odd' take alternate 4-row chunks, so every checksum block holds rows
    of both; a reader in this process checks every recorded row while they write."""
    _open(tmp_path / "s")
    procs = [_child(tmp_path / "s", writer=p, parity=p, delay=0.02) for p in ("even", "odd")]
    reader = _open(tmp_path / "s", writer="reader")
    errors, reads = [], 0
    while any(p.poll() is None for p in procs):
        try:
            written = _gaps({i for a, b in reader.missing() for i in range(a, b)}, N_ROWS)
            for lo, hi in written:
                reader.read(lo, hi)
                reads += 1
        except Exception as e:  # noqa: BLE001 -- collected and asserted below
            errors.append(e)
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert not errors, errors[:3]
    assert reads > 0
    assert (tmp_path / "s" / "rows.bin").read_bytes() == whole_run["float32"]
    assert torch.equal(_open(tmp_path / "s").read(0, N_ROWS), reader.read(0, N_ROWS))


# ----------------------------------------------------------------------------- damaged progress
def test_damaged_progress_gives_store_error(tmp_path):
    store = _open(tmp_path / "s")
    store.write(0, torch.randn(20, 8))
    record = tmp_path / "s" / "progress" / "main.json"
    good = record.read_text()
    for bad, match in [(good[: len(good) // 2], "main.json is corrupted"),
                       ("", "main.json is corrupted"),
                       ('{"version": 2, "ranges": [[5, 3]]}', "ranges must be sorted"),
                       ('{"version": 2, "ranges": [[0, 4], [4, 8]]}', "ranges must be sorted"),
                       ('{"version": 2, "ranges": [[0, 99]]}', r"within \[0, 42\]"),
                       ('{"version": 2, "ranges": "all"}', "ranges must be sorted"),
                       ('[[0, 20, 12345]]', "not a version-2 progress record")]:
        record.write_text(bad)
        with pytest.raises(StoreError, match=match):
            _open(tmp_path / "s")
        with pytest.raises(StoreError, match=match):
            _open(tmp_path / "s", writer="other")  # another writer's view refuses it too
    record.write_text(good)
    table = tmp_path / "s" / "checksums" / "main.crc"
    os.truncate(table, 16)
    with pytest.raises(StoreError, match="main.crc is truncated"):
        _open(tmp_path / "s", writer="other").read(0, 20)
    os.remove(table)
    with pytest.raises(StoreError, match="main.crc is missing"):
        _open(tmp_path / "s", writer="other").read(0, 20)


def test_store_of_an_older_format_is_refused_clearly(tmp_path):
    _open(tmp_path / "s").write(0, torch.randn(4, 8))
    manifest = tmp_path / "s" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"version": 2', '"version": 1'))
    for reopen in (lambda: _open(tmp_path / "s"), lambda: GradientStore.load(tmp_path / "s")):
        with pytest.raises(StoreError, match="format version 1; this grass reads version 2.*delete"):
            reopen()
