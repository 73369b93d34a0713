"""Time per ``GradientStore.write`` as the number of earlier writes grows, side by side with the
store as it was before coalesced records (``--old-ref``, read with ``git show`` into a temp
directory and imported from there).

Every write stores 4 rows of 64 fp32 columns, the next rows in order, into an on-disk store in a
temp directory. After 0, 10^2, 10^4 and 10^5 earlier writes, the store takes ``--rounds`` more
writes in interleaved rounds with a fresh store of its kind (one write per side per round,
medians), so a burst of load on the shared machine hits both alike: their ratio is the growth
of the cost of a write. Then the old store, filled to as many writes, runs in interleaved rounds
with its own fresh store and with the new one, up to ``--old-max`` earlier writes (its writes
grow linearly in cost, its fill quadratically). Also printed: the size of the writer's progress
record, and the two ways to flush the rows of one write (an msync of the rows' pages against
pwrite + fdatasync of the file), timed the same way.

    python -m bench.store_writes [--quick] [--old-ref REV] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import mmap
import os
import tempfile

import numpy as np
import torch
from tqdm import tqdm

from bench.baseline import module_at
from bench.timing import ensure_malloc_env, format_table, interleaved_ms
from grass.store import GradientStore

# The last commit whose store rewrote every record whole: the baseline.
OLD_REF = "89a5d27f48ac46322cf6c08295eb02ce99277cba"
BATCH, WIDTH = 4, 64


def old_store_module(ref: str, directory: str):
    """The grass.store of commit `ref`, imported from a copy in `directory`."""
    return module_at(ref, "python/grass/store.py", "old_store", directory)


class Filler:
    """Writes the next BATCH rows into one store per call; counts its writes."""

    def __init__(self, store_class, path: str, n_writes: int) -> None:
        self.store = store_class.open(path, config={"bench": "store_writes"},
                                      n_rows=BATCH * n_writes, layers={"features": WIDTH})
        self.record = os.path.join(path, "progress", "main.json")
        self.rows = torch.randn(BATCH, WIDTH)
        self.done = 0

    def __call__(self) -> None:
        self.store.write(BATCH * self.done, self.rows)
        self.done += 1

    def fill_to(self, n: int, label: str) -> None:
        for _ in tqdm(range(n - self.done), desc=f"{label}: fill to {n} writes", leave=False):
            self()


def flush_table(directory: str, rounds: int) -> list[dict]:
    """msync of one write's pages against pwrite + fdatasync, on one file of 10^5 batches."""
    row_bytes = BATCH * WIDTH * 4
    path = os.path.join(directory, "flush.bin")
    with open(path, "wb") as f:
        f.truncate(row_bytes * 100_000)
    fd = os.open(path, os.O_RDWR)
    mapped = mmap.mmap(fd, row_bytes * 100_000)
    data = np.random.rand(BATCH * WIDTH).astype(np.float32)
    position = {"msync": 0, "pwrite": 50_000}

    def msync() -> None:
        offset = position["msync"] * row_bytes
        mapped[offset:offset + row_bytes] = data.tobytes()
        aligned = offset - offset % mmap.PAGESIZE
        mapped.flush(aligned, offset + row_bytes - aligned)
        position["msync"] += 1

    def pwrite() -> None:
        os.pwrite(fd, data.tobytes(), position["pwrite"] * row_bytes)
        os.fdatasync(fd)
        position["pwrite"] += 1

    ms = interleaved_ms({"msync": msync, "pwrite": pwrite}, rounds, round_s=0)
    os.close(fd)
    return [{"flush of one 1 KiB write": "msync of its pages", "ms": f"{ms['msync']:.3f}",
             "pwrite+fdatasync / msync": f"{ms['pwrite'] / ms['msync']:.2f}"}]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.store_writes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="checkpoints 0, 10, 100 (a smoke run)")
    parser.add_argument("--old-ref", default=OLD_REF, help="git revision of the baseline store")
    parser.add_argument("--old-max", type=int, default=10_000,
                        help="the baseline runs up to this many earlier writes")
    parser.add_argument("--rounds", type=int, default=40, help="timed writes per side per checkpoint")
    parser.add_argument("--out", metavar="FILE.md", help="also write the tables here")
    args = parser.parse_args()
    ensure_malloc_env()

    checkpoints = [0, 10, 100] if args.quick else [0, 100, 10_000, 100_000]
    total = checkpoints[-1] + 2 * args.rounds + 2
    old_total = min(total, args.old_max + 2 * args.rounds + 2)
    with tempfile.TemporaryDirectory(prefix="store_writes") as tmp:
        old = old_store_module(args.old_ref, tmp)
        new = Filler(GradientStore, os.path.join(tmp, "new"), total)
        base = Filler(old.GradientStore, os.path.join(tmp, "old"), old_total)
        rows = []
        for c in checkpoints:
            new.fill_to(c, "new")
            earlier = new.done
            # Growth: against a fresh store of the same kind, in interleaved rounds.
            fresh = Filler(GradientStore, os.path.join(tmp, f"new-fresh-{c}"), args.rounds + 2)
            ms = interleaved_ms({"new": new, "fresh": fresh}, args.rounds, round_s=0)
            row = {"earlier writes": f"{earlier:,}", "new ms/write": f"{ms['new']:.2f}",
                   "new / fresh store": f"{ms['new'] / ms['fresh']:.2f}",
                   "new record bytes": os.path.getsize(new.record)}
            if c <= args.old_max:
                base.fill_to(earlier, "old")
                fresh_old = Filler(old.GradientStore, os.path.join(tmp, f"old-fresh-{c}"),
                                   args.rounds + 2)
                # Old against new: a slow side's syncs also slow the other side's (one journal).
                ms = interleaved_ms({"old": base, "fresh": fresh_old, "new": new}, args.rounds,
                                    round_s=0)
                row.update({"old ms/write": f"{ms['old']:.2f}",
                            "old / fresh store": f"{ms['old'] / ms['fresh']:.2f}",
                            "old / new (interleaved)": f"{ms['old'] / ms['new']:.2f}",
                            "old record bytes": os.path.getsize(base.record)})
            rows.append(row)
            print(format_table([row], list(row)), flush=True)
        flush = flush_table(tmp, args.rounds)
    columns = ["earlier writes", "new ms/write", "new / fresh store", "old ms/write",
               "old / fresh store", "old / new (interleaved)", "new record bytes", "old record bytes"]
    text = (f"4-row fp32 writes, {WIDTH} columns, {args.rounds} interleaved rounds per comparison, "
            f"baseline {args.old_ref[:12]}\n\n" + format_table(rows, columns)
            + "\n\n" + format_table(flush, list(flush[0])))
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
