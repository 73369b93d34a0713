"""Exhaustive scoring against the read floor: GB/s of ``attribute`` and ``top_k`` over an
on-disk store of synthetic rows, side by side with the scorer of ``--old-ref`` (read with
``git show`` and imported as a module of this grass), against one sequential read of rows.bin.

The rows are random (seeded); the timings are real. For every page-cache state (cold: the
file's pages dropped with posix_fadvise before every call; warm: read once before), every test
batch size (1, 16, 256 rows) and both operations, the old and the new scorer run in interleaved
rounds in this one process, so that load on a shared machine hits both alike; the read floor is
timed in the same rounds. Throughput is store bytes / median seconds per call. ``--sweep`` adds
a table of the new scorer's warm throughput against its chunk size (rows per read and checksum
check) and tile size (fp32 bytes a 16-bit chunk is widened in), also interleaved;
``--ceiling`` (alone) the new scorer against its own GEMMs on rows held in memory (the
compute ceiling where the GEMM is the bottleneck); ``--first-query`` the first query after
opening the store (which checks every block's crc32)
against a later one and a crc32 pass alone. A last table
compares ``cosine`` under an efim preconditioner (old: the preconditioner over every train chunk
per query; new: the train norms computed once and kept with the store).

    python -m bench.scoring [--rows N] [--width W] [--dtype bfloat16] [--rounds R] [--sweep]
                            [--ceiling] [--first-query] [--no-cosine]
                            [--dir DIR] [--out FILE.md] [--plot FILE.png] [--smoke]
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import tempfile
import time
import zlib

import torch
from tqdm import tqdm

from bench.baseline import module_at
from bench.timing import ensure_malloc_env, format_table, report
from grass import curvature, scoring
from grass.curvature import Preconditioner
from grass.scoring import Scorer
from grass.store import GradientStore

# The scorer this one replaces: fp32 copies of every chunk (bf16 widened whole), read in turn.
OLD_REF = "2f9152a"
LAYERS = 4
READ_BYTES = 64 << 20  # one sequential read() of the floor
# Rows of the cosine comparison (the old scorer preconditions every chunk in fp64 per query).
COSINE_ROWS = 100_000


def old_scoring_module(ref: str, directory: str):
    """grass.scoring as of commit ``ref``, imported as grass.baseline_scoring from a copy."""
    return module_at(ref, "python/grass/scoring.py", "grass.baseline_scoring", directory)


class BaselineStoreView:
    """``store`` as the baseline scorer reads it: every attribute of the store, plus its
    columns as the name -> (start, stop) dict ``offsets`` that the baseline module takes."""

    def __init__(self, store: GradientStore):
        self._store = store
        self.offsets = {name: (c.start, c.stop) for name, c in store.layout.items()}

    def __getattr__(self, name: str):
        return getattr(self._store, name)


def synthetic_store(path: str, n_rows: int, width: int, dtype: torch.dtype) -> GradientStore:
    """A store of n_rows seeded random rows in LAYERS equal layers, reused when it exists."""
    layers = {f"layer{i}": width // LAYERS for i in range(LAYERS)}
    store = GradientStore.open(path, config={"bench": "scoring", "seed": 0}, n_rows=n_rows,
                               layers=layers, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    step = 1 << 14
    for start, stop in tqdm(store.missing(), desc="synthetic rows", unit="range"):
        for a in range(start, stop, step):
            b = min(a + step, stop)
            store.write(a, torch.randn(b - a, store.width, generator=g))
    return store


def drop_pages(store: GradientStore) -> None:
    """Evict rows.bin from the page cache: unmap our pages, then advise the kernel to drop
    the file's (clean) pages."""
    store._map.madvise(mmap.MADV_DONTNEED)
    fd = os.open(os.path.join(store.path, "rows.bin"), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sequential_read(path: str) -> None:
    """The read floor: rows.bin read front to back into one reused buffer."""
    buf = bytearray(READ_BYTES)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def timed_rounds(sides: dict, rounds: int, before=None) -> dict[str, float]:
    """Median seconds per call of each side over interleaved rounds; ``before`` runs untimed
    before every call (evicting the page cache for cold runs)."""
    times = {side: [] for side in sides}
    for _ in range(rounds):
        for side, fn in sides.items():
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            times[side].append(time.perf_counter() - t0)
    return {side: statistics.median(t) for side, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scoring", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--width", type=int, default=1024, help="columns (LAYERS equal layers)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--chunk", type=int, default=16384, help="rows per scoring chunk")
    parser.add_argument("--tests", default="1,16,256", help="test batch sizes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--old-ref", default=OLD_REF)
    parser.add_argument("--dir", help="where the store lives (kept); default: a temp dir")
    parser.add_argument("--out", metavar="FILE.md")
    parser.add_argument("--plot", metavar="FILE.png")
    parser.add_argument("--sweep", action="store_true", help="chunk and tile sizes, warm")
    parser.add_argument("--no-cosine", action="store_true", help="skip the cosine table")
    parser.add_argument("--ceiling", action="store_true",
                        help="only the new scorer against the floor and its GEMMs alone, warm")
    parser.add_argument("--first-query", action="store_true",
                        help="add the first query after open (checksums) against later ones")
    parser.add_argument("--smoke", action="store_true", help="20000 rows, 1 round")
    args = parser.parse_args()
    ensure_malloc_env()
    if args.smoke:
        args.rows, args.rounds = 20_000, 1
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory(prefix="bench_scoring") as tmp:
        old = old_scoring_module(args.old_ref, tmp)
        store = synthetic_store(args.dir or os.path.join(tmp, "store"), args.rows, args.width,
                                dtype)
        rows_bin = os.path.join(store.path, "rows.bin")
        # Every block's checksum is verified once per process, at its first read: do that
        # before timing, so that no side pays it.
        for start in tqdm(range(0, store.n_rows, args.chunk), desc="verify checksums"):
            store.read_raw(start, min(start + args.chunk, store.n_rows))
        gb = os.path.getsize(rows_bin) / 1e9
        if args.ceiling:
            text = ceiling_table(store, args, gb)
            header = (f"{args.rows:,} rows x {store.width} {args.dtype} ({gb:.2f} GB), chunks "
                      f"of {args.chunk} rows, {args.rounds} interleaved rounds, "
                      f"{torch.get_num_threads()} threads; load average "
                      f"{os.getloadavg()[0]:.1f} after ({os.cpu_count()} cores)")
            report(header + "\n\n" + text + "\n", args.out)
            return
        identity = Preconditioner.identity(store.layout)
        scorers = {"old": old.Scorer(BaselineStoreView(store), identity, args.chunk),
                   "new": Scorer(store, identity, args.chunk)}
        g = torch.Generator().manual_seed(1)
        load_before = os.getloadavg()
        results = []
        for cache in ("cold", "warm"):
            before = (lambda: drop_pages(store)) if cache == "cold" else None
            for n_test in [int(t) for t in args.tests.split(",")]:
                test = torch.randn(n_test, store.width, generator=g)
                for op in ("attribute", "top_k"):
                    call = ((lambda s, t=test: s.scores(t)) if op == "attribute" else
                            (lambda s, t=test: s.top_k(t, 10)))
                    sides = {"read floor": lambda: sequential_read(rows_bin)}
                    sides.update({name: (lambda s=s, c=call: c(s)) for name, s in scorers.items()})
                    if cache == "warm":
                        sequential_read(rows_bin)
                    sec = timed_rounds(sides, args.rounds, before)
                    row = {"cache": cache, "test rows": n_test, "op": op,
                           "floor GB/s": f"{gb / sec['read floor']:.2f}",
                           "old GB/s": f"{gb / sec['old']:.2f}",
                           "new GB/s": f"{gb / sec['new']:.2f}",
                           "old / floor": f"{sec['read floor'] / sec['old']:.2f}",
                           "new / floor": f"{sec['read floor'] / sec['new']:.2f}",
                           "new speed-up": f"{sec['old'] / sec['new']:.2f}"}
                    results.append(row)
                    print(format_table([row], list(row)), flush=True)
        extra = [] if args.no_cosine else [cosine_table(store, old, args, gb)]
        if args.sweep:
            extra.insert(0, sweep_table(store, args, gb))
        if args.first_query:
            extra.insert(0, first_query_table(store, args, gb))
        load_after = os.getloadavg()
    header = (f"{args.rows:,} rows x {store.width} {args.dtype} ({gb:.2f} GB), chunks of "
              f"{args.chunk} rows, identity preconditioner, {args.rounds} interleaved rounds, "
              f"{torch.get_num_threads()} threads, baseline {args.old_ref}; load average "
              f"{load_before[0]:.1f} before, {load_after[0]:.1f} after ({os.cpu_count()} cores)")
    report("\n\n".join([header, format_table(results, list(results[0])), *extra]) + "\n", args.out)
    if args.plot:
        plot(results, args.plot, header)


def sweep_table(store, args, gb: float) -> str:
    """Warm GB/s of the new scorer's ``scores`` for 1 and 16 test rows against its chunk size
    in rows (no CHUNK_BYTES floor, at the default tile) and, for a 16-bit store, its tile size
    (at --chunk rows), interleaved."""
    configs = {f"chunk {c} rows": (c, scoring.TILE_BYTES) for c in (4096, 16384, 65536)}
    if store.dtype != torch.float32:
        configs.update({f"tile {t >> 10} KiB": (args.chunk, t)
                        for t in (1 << 18, 1 << 20, 1 << 22) if t != scoring.TILE_BYTES})
    identity = Preconditioner.identity(store.layout)
    defaults = scoring.TILE_BYTES, scoring.CHUNK_BYTES
    rows = []
    for n_test in (1, 16):
        test = torch.randn(n_test, store.width, generator=torch.Generator().manual_seed(3))

        def run(chunk: int, tile: int, t=test) -> None:
            scoring.TILE_BYTES, scoring.CHUNK_BYTES = tile, 0
            try:
                Scorer(store, identity, chunk).scores(t)
            finally:
                scoring.TILE_BYTES, scoring.CHUNK_BYTES = defaults

        sequential_read(os.path.join(store.path, "rows.bin"))
        sec = timed_rounds({name: (lambda c=c: run(*c)) for name, c in configs.items()},
                           args.rounds)
        rows.append({f"test rows (warm scores, tile {defaults[0] >> 10} KiB)": n_test,
                     **{name: f"{gb / t:.2f} GB/s" for name, t in sec.items()}})
    return format_table(rows, list(rows[0]))


def ceiling_table(store, args, gb: float) -> str:
    """Warm ``scores`` of the new scorer against the read floor and against its GEMMs alone:
    the same tiles (widened when 16-bit) over one chunk of rows held in memory, repeated to
    cover the store, with no file, map or checksum involved; interleaved."""
    identity = Preconditioner.identity(store.layout)
    scorer = Scorer(store, identity, args.chunk)
    rows = scorer._chunk_rows(torch.device("cpu"))
    resident = store.read_raw(0, rows)  # (rows, width) in the store dtype, in memory
    full, rest = divmod(store.n_rows, rows)
    rows_bin = os.path.join(store.path, "rows.bin")
    table = []
    for n_test in [int(t) for t in args.tests.split(",")]:
        test = torch.randn(n_test, store.width, generator=torch.Generator().manual_seed(5))
        products = scoring._ChunkProducts(test, store.layout, False, store.dtype, rows)

        def gemm_alone(p=products) -> None:
            for _ in range(full):
                p(resident)
            if rest:
                p(resident[:rest])

        sequential_read(rows_bin)
        sec = timed_rounds({"read floor": lambda: sequential_read(rows_bin),
                            "new": lambda t=test: scorer.scores(t), "GEMM alone": gemm_alone},
                           args.rounds)
        table.append({"test rows (warm scores)": n_test,
                      "floor GB/s": f"{gb / sec['read floor']:.2f}",
                      "GEMM alone GB/s": f"{gb / sec['GEMM alone']:.2f}",
                      "new GB/s": f"{gb / sec['new']:.2f}",
                      "new / floor": f"{sec['read floor'] / sec['new']:.2f}",
                      "new / GEMM alone": f"{sec['GEMM alone'] / sec['new']:.2f}"})
    return format_table(table, list(table[0]))


def first_query_table(store, args, gb: float) -> str:
    """Warm: the first ``scores`` of one test row on a freshly opened store (which checks
    every block's crc32 as it reads) against the same call on a store whose blocks are already
    checked, and a crc32 pass over rows.bin alone, interleaved."""
    identity = Preconditioner.identity(store.layout)
    test = torch.randn(1, store.width, generator=torch.Generator().manual_seed(4))
    checked = Scorer(store, identity, args.chunk)
    rows_bin = os.path.join(store.path, "rows.bin")

    def crc_pass() -> None:
        with open(rows_bin, "rb", buffering=0) as f:
            crc, buf = 0, bytearray(READ_BYTES)
            while n := f.readinto(buf):
                crc = zlib.crc32(memoryview(buf)[:n], crc)

    sequential_read(rows_bin)
    sec = timed_rounds({
        "read floor": lambda: sequential_read(rows_bin),
        "crc32 of rows.bin": crc_pass,
        "first query after open": lambda: Scorer(GradientStore.load(store.path), identity,
                                                 args.chunk).scores(test),
        "later query": lambda: checked.scores(test),
    }, args.rounds)
    row = {"1 test row, warm": "GB/s", **{k: f"{gb / t:.2f}" for k, t in sec.items()}}
    return format_table([row], list(row))


def cosine_table(store, old, args, gb: float) -> str:
    """Warm cosine scores of 16 test rows under efim over the first COSINE_ROWS rows: old and
    new scorer in interleaved rounds (the new one's norms computed once before timing, as a
    kept store holds them; that pass is timed apart)."""
    rows = (0, min(COSINE_ROWS, store.n_rows))
    gb *= rows[1] / store.n_rows
    fishers = {name: s / rows[1] for name, s in
               curvature.fisher_sums(store, rows, args.chunk).items()}
    pre = Preconditioner.efim(fishers, store.layout, 0.5)
    new = Scorer(store, pre, args.chunk, rows=rows)
    t0 = time.perf_counter()
    new.train_quadratics()
    once = time.perf_counter() - t0
    base = old.Scorer(BaselineStoreView(store), pre, args.chunk, rows=rows)
    test = torch.randn(16, store.width, generator=torch.Generator().manual_seed(2))
    sec = timed_rounds({"old": lambda: base.scores(test, cosine=True),
                        "new": lambda: new.scores(test, cosine=True)}, args.rounds)
    row = {"cosine, efim, 16 test rows (warm)": f"{rows[1]:,} rows, s per call", "old": f"{sec['old']:.2f}",
           "new": f"{sec['new']:.2f}", "new speed-up": f"{sec['old'] / sec['new']:.2f}",
           "new GB/s": f"{gb / sec['new']:.2f}", "norms pass once (s)": f"{once:.2f}"}
    return format_table([row], list(row))


def plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, cache in zip(axes, ("cold", "warm")):
        rows = [r for r in results if r["cache"] == cache]
        labels = [f"{r['op']}\n{r['test rows']} test" for r in rows]
        x = range(len(rows))
        for shift, key in ((-0.27, "floor GB/s"), (0, "old GB/s"), (0.27, "new GB/s")):
            ax.bar([i + shift for i in x], [float(r[key]) for r in rows], 0.27,
                   label=key.replace(" GB/s", ""))
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_title(f"{cache} page cache")
        ax.set_ylabel("GB/s of rows.bin")
    axes[0].legend()
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
