"""GradientStore on real files: round trips, resume after SIGKILL, refusal of mismatched or
damaged stores."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from grass.store import GradientStore, StoreError

LAYERS = {"fc1": 5, "fc2.weight": 3}
CONFIG = {"compressor": {"name": "FactGraSS", "k": 8, "seed": 0}, "model": "mlp"}

# The caching job run in a child process: fills the store's missing rows in chunks of 4, each
# row a deterministic function of its index (as a real capture is of its example), and reports
# every chunk once it is recorded.
CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from grass.store import GradientStore
    path, dtype, delay = sys.argv[1], getattr(torch, sys.argv[2]), float(sys.argv[3])
    store = GradientStore.open(path, config={config!r}, n_rows={n!r}, layers={layers!r}, dtype=dtype)
    for lo, hi in store.missing():
        for start in range(lo, hi, 4):
            stop = min(start + 4, hi)
            g = torch.Generator().manual_seed(1000 + start)
            store.write(start, torch.randn(stop - start, store.width, generator=g))
            print(start, flush=True)
            time.sleep(delay)
    """
)
N_ROWS = 42


def _child(path, dtype: str, delay: float) -> subprocess.Popen:
    code = CHILD.format(config=CONFIG, n=N_ROWS, layers=LAYERS)
    return subprocess.Popen([sys.executable, "-c", code, str(path), dtype, str(delay)],
                            stdout=subprocess.PIPE, text=True)


def _open(path, **kw):
    args = dict(config=CONFIG, n_rows=N_ROWS, layers=LAYERS, dtype=torch.float32)
    args.update(kw)
    return GradientStore.open(path, **args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("on_disk", [False, True])
def test_round_trip_layers_and_chunks(tmp_path, dtype, on_disk):
    store = _open(tmp_path / "s" if on_disk else None, dtype=dtype)
    assert store.width == 8 and store.offsets == {"fc1": (0, 5), "fc2.weight": (5, 8)}
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


def test_sigkill_mid_run_resumes_bit_identical(tmp_path):
    dtype = "bfloat16"  # the uint16-view path; fp32 goes through the same writes
    whole = _child(tmp_path / "whole", dtype, 0.0)
    assert whole.wait(timeout=60) == 0

    killed = _child(tmp_path / "killed", dtype, 0.2)
    done = [int(killed.stdout.readline()) for _ in range(3)]
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL
    missing = _open(tmp_path / "killed", dtype=getattr(torch, dtype)).missing()
    assert missing and missing[0][0] >= 12 and sum(b - a for a, b in missing) < N_ROWS

    resumed = _child(tmp_path / "killed", dtype, 0.0)
    out, _ = resumed.communicate(timeout=60)
    redone = [int(s) for s in out.split()]
    assert resumed.returncode == 0
    assert not set(redone) & set(done), "a resumed run recomputes only the missing rows"
    assert redone[0] == missing[0][0]
    assert (tmp_path / "whole" / "rows.bin").read_bytes() == (tmp_path / "killed" / "rows.bin").read_bytes()
    assert _open(tmp_path / "killed", dtype=getattr(torch, dtype)).missing() == []


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


def test_corrupted_rows_give_checksum_error_not_wrong_data(tmp_path):
    store = _open(tmp_path / "s")
    store.write(0, torch.randn(20, 8))
    store.write(20, torch.randn(N_ROWS - 20, 8))
    with open(tmp_path / "s" / "rows.bin", "r+b") as f:
        f.seek(25 * 8 * 4 + 3)  # one byte inside row 25
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    fresh = _open(tmp_path / "s")
    assert fresh.read(0, 20).shape == (20, 8)  # the intact range still reads
    with pytest.raises(StoreError, match=r"rows \[20, 42\).*checksum"):
        fresh.read(24, 26)
    with pytest.raises(StoreError, match="checksum"):
        list(fresh.chunks(16))


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
    assert store.config == CONFIG and store.layers == LAYERS and store.dtype == torch.float16
    assert torch.equal(store.read(0, N_ROWS), rows.half().float())
    with pytest.raises(StoreError, match="no manifest.json"):
        GradientStore.load(tmp_path / "elsewhere")
