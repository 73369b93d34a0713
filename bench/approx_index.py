"""Approximate top-k (``attr.build_index`` + ``top_k(approximate=True)``): recall and latency.

    .venv/bin/python -m bench.approx_index     # digits + LM recall, latency at n = 1e4, 1e5
    .venv/bin/python -m bench.approx_index --recall --sizes 10000 100000 1000000 --dir /big/disk

Recall: recall@10 of the approximate top-10 against the exhaustive top-10 on the digits
features (an MLP trained on sklearn's digits, hessian="efim") and the LM benchmark's GPT-2
features, for sketch widths, FAISS index kinds and candidate multipliers. Latency: one query
against synthetic bf16 stores of n rows of width 4096 (four layers of 1024; the rows are
random but low-rank plus noise, like gradients, so that a top-10 exists to find; the timings
are real), exhaustive ``top_k`` against ``top_k(approximate=True)`` timed in interleaved
rounds in this one process, with the recall@10 of the same queries, and the first
approximate query of a freshly opened Attributor (which verifies the checksum blocks of its
candidate rows; later queries skip blocks already verified).
Writes bench/results/approx_index_recall.md and approx_index_latency.md, .json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import grass
from grass import curvature
from grass.attributor import Features
from grass.index import require_faiss
from grass.store import GradientStore

from .timing import ensure_malloc_env, format_table, interleaved_ms

RESULTS = Path(__file__).resolve().parent / "results"
K = 10
SYNTHETIC_LAYERS, SYNTHETIC_K = 4, 1024  # width 4096
SYNTHETIC_RANK = 64


def recall(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean fraction of each exact top-k row set that the approximate top-k found."""
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact))
    return hits / exact.numel()


# -- recall on real features --------------------------------------------------------------------
def digits_recall(workdir: Path) -> list[dict]:
    from grass.demo.digits import load_digits, per_example_loss

    task = load_digits(n_train=1500, n_test=297)
    model = task.train()
    rows = []
    settings = ((grass.Identity(), (256, 512, 1024)), (grass.FactGraSS(k=256), (128, 256, 512)))
    for compressor, dims in settings:
        name = type(compressor).__name__
        attr = grass.Attributor(model, per_example_loss, compressor, store=workdir / name,
                                batch_size=100, progress=False)
        attr.cache((task.x_train, task.y_train))
        rows += recall_rows(f"digits {name}", attr, attr.features((task.x_test, task.y_test)),
                            dims)
    return rows


def lm_recall(workdir: Path) -> list[dict]:
    """The LM benchmark's full-size GPT-2 and blocks (bench/lm.py), FactGraSS features."""
    from .lm import FULL
    from .lm_data import load_blocks, per_example_loss, train

    train_blocks, test_blocks = load_blocks(FULL.lm)
    model = train(FULL.lm, train_blocks)
    attr = grass.Attributor(model, per_example_loss, grass.FactGraSS(k=FULL.k),
                            store=workdir / "lm", batch_size=FULL.lm.batch_size, progress=False)
    attr.cache(train_blocks)
    return recall_rows(f"LM FactGraSS(k={FULL.k})", attr, attr.features(test_blocks),
                       (256, 512, 1024))


def recall_rows(label: str, attr: grass.Attributor, test: Features, dims) -> list[dict]:
    """Recall@K of flat and pq indexes of each sketch width in ``dims``, for several candidate
    multipliers, against the exhaustive top-K of ``test``."""
    _, exact = attr.top_k(test, K)
    n, rows = attr.store.n_rows, []
    for dim in dims:
        for kind, multipliers in (("flat", (2, 5, 10)), ("pq", (10, 30))):
            index = attr.build_index(dim=dim, kind=kind)
            for candidates in multipliers:
                _, approx = attr.top_k(test, K, approximate=True, candidates=candidates)
                rows.append({
                    "features": label, "train rows": n, "queries": len(test.values),
                    "width": attr.store.width, "dim": index.dim, "index": kind,
                    "candidates": f"{candidates} x {K}",
                    "rows read": f"{min(candidates * K, n) / n:.1%}",
                    f"recall@{K}": f"{recall(approx, exact):.3f}",
                })
    return rows


# -- latency on synthetic stores ----------------------------------------------------------------
def synthetic_attributor(path: Path, n: int, *, seed: int = 0) -> grass.Attributor:
    """An Attributor over a bf16 store of n synthetic rows of width 4096, efim curvature from
    the first rows (written once; a rerun reuses the store)."""
    torch.manual_seed(seed)  # the same weights, so that a rerun reopens the same store
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(SYNTHETIC_LAYERS)])
    attr = grass.Attributor(model, lambda m, b: m(b).sum(1), grass.FactGraSS(k=SYNTHETIC_K),
                            store=path, store_dtype=torch.bfloat16, progress=False)
    store = GradientStore.open(path, config=attr.config, n_rows=n, layers=attr.layers.layout,
                               dtype=torch.bfloat16)
    basis = synthetic_basis(seed)
    chunk = 8192
    starts = [(start, min(start + chunk, b)) for a, b in store.missing()
              for start in range(a, b, chunk)]
    for start, stop in tqdm(starts, desc=f"synthetic store n={n}", unit="chunk"):
        store.write(start, synthetic_rows(basis, stop - start, seed=seed * 10**7 + start))
    if not curvature.has_fisher(store, "efim"):
        sample = store.read(0, min(n, 8192))
        fishers = {name: (sample[:, c.cols].T @ sample[:, c.cols]) / sample.shape[0]
                   for name, c in store.layout.items()}
        curvature.save_fisher(store, "efim", fishers, (attr.damping, attr.absolute_damping))
    return grass.Attributor.load(path, model, attr.loss_fn, progress=False)


def synthetic_basis(seed: int) -> torch.Tensor:
    """(rank, width) directions shared by all rows, decaying in scale like gradient spectra."""
    g = torch.Generator().manual_seed(seed)
    width = SYNTHETIC_LAYERS * SYNTHETIC_K
    scale = torch.arange(1, SYNTHETIC_RANK + 1, dtype=torch.float32) ** -0.5
    return torch.randn(SYNTHETIC_RANK, width, generator=g) * scale[:, None]


def synthetic_rows(basis: torch.Tensor, m: int, *, seed: int) -> torch.Tensor:
    """(m, width) fp32: low-rank part from ``basis`` plus isotropic noise of a tenth its size."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(m, basis.shape[0], generator=g) @ basis
    return low + 0.1 * torch.randn(m, basis.shape[1], generator=g)


def latency(workdir: Path, n: int, *, dim: int, kind: str, candidates: int | None,
            queries: int, rounds: int) -> dict:
    attr = synthetic_attributor(workdir / f"synthetic_{n}", n)
    t0 = time.perf_counter()
    index = attr.build_index(dim=dim, kind=kind, candidates=candidates)
    build_s = time.perf_counter() - t0
    test = synthetic_rows(synthetic_basis(0), queries + 1, seed=12345)
    one = Features(test[:1], attr.config)
    # A fresh Attributor has verified no checksum block yet: its first query checks those of
    # its candidate rows (the exhaustive queries below verify every block of ``attr``).
    fresh = grass.Attributor.load(attr.store.path, attr.model, attr.loss_fn, progress=False)
    fresh._scorer_checked()  # its curvature factored before the clock starts
    t0 = time.perf_counter()
    fresh.top_k(one, K, approximate=True)
    first_ms = (time.perf_counter() - t0) * 1e3
    features = Features(test[1:], attr.config)
    _, exact = attr.top_k(features, K)
    _, approx = attr.top_k(features, K, approximate=True)
    ms = interleaved_ms({
        "exhaustive": lambda: attr.top_k(one, K),
        "approximate": lambda: attr.top_k(one, K, approximate=True),
    }, rounds, round_s=0)
    manifest = index.manifest
    return {
        "n": n, "width": attr.store.width, "store GB": f"{n * attr.store.width * 2 / 1e9:.2f}",
        "dim": index.dim, "index": manifest["kind"]
        + (f" (nlist {manifest['nlist']}, nprobe {manifest['nprobe']})"
           if manifest["kind"] == "ivf" else ""),
        "candidates": f"{manifest['candidates']} x {K}", "build (s)": f"{build_s:.1f}",
        "exhaustive (ms)": f"{ms['exhaustive']:.1f}", "approximate (ms)": f"{ms['approximate']:.2f}",
        "speed-up": f"{ms['exhaustive'] / ms['approximate']:.1f}x",
        "first query, fresh (ms)": f"{first_ms:.1f}",
        f"recall@{K} ({queries} queries)": f"{recall(approx, exact):.3f}",
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["n"] for r in rows]
    recall_key = next(key for key in rows[0] if key.startswith("recall"))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.loglog(n, [float(r["exhaustive (ms)"]) for r in rows], "o-", label="exhaustive")
    left.loglog(n, [float(r["approximate (ms)"]) for r in rows], "s-", label="approximate")
    left.set(xlabel="train rows n (width 4096, bf16)", ylabel="one query, top-10 (ms)",
             title="latency")
    left.legend()
    right.semilogx(n, [float(r[recall_key]) for r in rows], "o-")
    right.axhline(0.95, ls="--", c="gray")
    right.set(xlabel="train rows n", ylabel="recall@10 vs exhaustive", ylim=(0, 1.02),
              title="recall (synthetic rows)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ensure_malloc_env()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recall", nargs="*", choices=["digits", "lm"], default=["digits", "lm"],
                        help="real-feature recall tables (none: --recall with no names)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--kind", default="auto", help="FAISS index kind of the latency rows")
    parser.add_argument("--candidates", type=int, default=None,
                        help="candidates per wanted row (default: the index kind's own)")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--faiss-threads", type=int, default=1)
    parser.add_argument("--dir", type=Path, help="where the stores go (kept)")
    args = parser.parse_args()
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="grass_approx_"))
    torch.set_num_threads(2)
    faiss = require_faiss()
    # One query is too small a search to share: FAISS's OpenMP threads then wait on each other.
    faiss.omp_set_num_threads(args.faiss_threads)
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} torch threads (one in the "
              f"approximate query path), FAISS {faiss.__version__} with {args.faiss_threads} "
              f"thread(s), malloc thresholds set; the machine was shared with other jobs (load "
              f"average at the start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)\n\n")
    RESULTS.mkdir(exist_ok=True)
    if args.recall:
        rows = []
        for name in args.recall:
            rows += {"digits": digits_recall, "lm": lm_recall}[name](workdir)
        text = (f"## Recall@{K} on real features (efim, flat and pq indexes of the sketches)\n\n"
                + format_table(rows, list(rows[0])) + "\n")
        (RESULTS / "approx_index_recall.md").write_text(
            f"# python -m bench.approx_index --recall {' '.join(args.recall)} --sizes\n\n"
            + header + text)
        print(text, flush=True)
    rows = []
    for n in args.sizes:  # results are written after each size: a large one may not finish
        rows.append(latency(workdir, n, dim=args.dim, kind=args.kind,
                            candidates=args.candidates, queries=args.queries,
                            rounds=args.rounds))
        text = ("## One query, top-10: exhaustive vs approximate (synthetic bf16 stores, width "
                f"4096, median of {args.rounds} interleaved rounds)\n\n"
                + format_table(rows, list(rows[0])) + "\n")
        (RESULTS / "approx_index_latency.md").write_text(
            f"# python -m bench.approx_index --recall --sizes {' '.join(map(str, args.sizes))}"
            f" --dim {args.dim} --kind {args.kind} --rounds {args.rounds}\n\n" + header + text
            + f"\nLoad average when this size finished: {os.getloadavg()[0]:.1f}\n")
        (RESULTS / "approx_index_latency.json").write_text(json.dumps(rows, indent=1))
        plot(rows, RESULTS / "approx_index_latency.png")
        print(text, flush=True)


if __name__ == "__main__":
    main()
