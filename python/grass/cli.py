"""The `grass` command: attribute a language model from local files, and the digits demo.

    grass build --model DIR --data FILE --out INDEX     index the documents of FILE (grass.hf)
    grass query INDEX --data FILE | --text "..." --out HITS.jsonl [--top K] [--aggregate mean]
    grass demo [--out grass_out] [--quick]      LDS and time per method over a sweep of k, a PNG
    grass damping [--out grass_out] [--quick]   LDS against relative damping, and the held-out choice

Both train the digits MLP (a TRAK-style ensemble of checkpoints), retrain it on random 50%
subsets for the LDS ground truth (cached in --out, so a rerun skips it), and attribute the test
set with each compressor. Seeds vary the compressors' random maps: the spread over seeds is the
noise against which methods are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from . import compressors as C
from .attributor import DEFAULT_DAMPING, Attributor
from .data import DigitsTask, load_digits, per_example_loss
from .ensemble import Ensemble
from .lds import lds, subset_targets
from .selective import train_masks

METHODS = ["FactGraSS", "LoGra", "FactSJLT", "GraSS", "RandomMask", "SelectiveMask"]
# The demo runs at the Attributor's default relative damping (0.5); measured on this benchmark,
# mean LDS over all methods and k: 0.341 at 1e-3, 0.468 at 0.1, 0.489 at 0.5, 0.487 at 1, 0.440 at 10.
DAMPING_GRID = [1e-3, 1e-2, 1e-1, 0.5, 1.0, 10.0]


@dataclass
class Setting:
    """Sizes of one benchmark run; `quick` is the reduced one the test suite runs."""

    n_train: int = 1000
    n_test: int = 100
    n_subsets: int = 50
    n_models: int = 3
    seeds: int = 3
    ks: tuple[int, ...] = (16, 64, 256, 1024)
    epochs: int = 300

    @classmethod
    def quick(cls) -> Setting:
        return cls(n_train=200, n_test=20, n_subsets=12, n_models=1, seeds=1, ks=(32, 256),
                   epochs=100)


@dataclass
class Result:
    method: str
    k: int | None
    damping: float
    lds: list[float]  # one per seed
    seconds: float  # (mask training +) cache + attribute over the ensemble, mean over seeds
    halves: list[tuple[float, float]]  # per seed: LDS on the even and on the odd test examples

    @property
    def mean(self) -> float:
        return statistics.fmean(self.lds)

    @property
    def spread(self) -> float:
        return statistics.stdev(self.lds) if len(self.lds) > 1 else 0.0


def make_compressor(method: str, k: int | None, task: DigitsTask, model, seed: int) -> C.Compressor:
    """The compressor `method` at k per layer; SelectiveMask is trained for `model` first."""
    if method == "Identity":
        return C.Identity()
    if method == "SelectiveMask":
        # Trained on training examples only (96 as "train", 32 as "test" gradients), so the
        # evaluated test set never informs the mask.
        sample = (task.x_train[:128], task.y_train[:128])
        masks = train_masks(model, per_example_loss, tuple(t[:96] for t in sample),
                            tuple(t[96:] for t in sample), k=k, seed=seed)
        return C.SelectiveMask(k, indices=masks)
    return getattr(C, method)(k=k)


def ensemble_scores(task: DigitsTask, models, method: str, k: int | None, *, damping: float,
                    seed: int) -> torch.Tensor:
    """Scores (n_test, n_train) averaged over the checkpoints (grass.Ensemble, as TRAK)."""
    ensemble = Ensemble([
        Attributor(model, per_example_loss, make_compressor(method, k, task, model, seed),
                   damping=damping, seed=seed, batch_size=256, progress=False)
        for model in models
    ])
    ensemble.cache((task.x_train, task.y_train))
    return ensemble.attribute((task.x_test, task.y_test))


def prepare(setting: Setting, out: str):
    """The task, its checkpoint ensemble and the LDS ground truth (cached under `out`)."""
    task = load_digits(setting.n_train, setting.n_test, epochs=setting.epochs)

    def evaluate(subsets, seeds):
        return torch.stack([task.test_margins(m) for m in task.train_many(subsets, seeds)])

    recipe = {"n_train": setting.n_train, "n_test": setting.n_test, "hidden": task.hidden,
              "epochs": task.epochs, "lr": task.lr, "weight_decay": task.weight_decay}
    subsets, targets = subset_targets(evaluate, task.n_train, n_subsets=setting.n_subsets,
                                      batch=25, cache=os.path.join(out, "lds_targets.npz"),
                                      config=recipe)
    models = task.ensemble(setting.n_models, seed=10_000)  # seeds apart from the subset models'
    accuracy = statistics.fmean(task.accuracy(m) for m in models)
    return task, models, subsets, targets, accuracy


def sweep(task, models, subsets, targets, setting: Setting, methods: Sequence[str],
          dampings: Sequence[float]) -> list[Result]:
    """LDS and time for every (method, k, damping), each over `setting.seeds` compressor seeds."""
    jobs = [("Identity", None)] + [(m, k) for m in methods for k in setting.ks]
    results = []
    bar = tqdm(total=len(jobs) * len(dampings) * setting.seeds, desc="attribution", unit="run")
    for method, k in jobs:
        seeds = range(1 if method == "Identity" else setting.seeds)  # Identity has no randomness
        for damping in dampings:
            values, seconds, halves = [], [], []
            for seed in seeds:
                t0 = time.perf_counter()
                scores = ensemble_scores(task, models, method, k, damping=damping, seed=seed)
                seconds.append(time.perf_counter() - t0)
                values.append(lds(scores, subsets, targets))
                halves.append(tuple(lds(scores[h::2], subsets, targets[:, h::2]) for h in (0, 1)))
                bar.update(setting.seeds if method == "Identity" else 1)
            results.append(Result(method, k, damping, values, statistics.fmean(seconds), halves))
    bar.close()
    return results


def format_results(results: Sequence[Result]) -> str:
    """A plain-text table: one row per (method, k) and damping."""
    lines = [f"{'method':<13} {'k/layer':>7} {'damping':>8} {'LDS':>7} {'±seeds':>7} {'time s':>7}"]
    for r in results:
        k = "full" if r.k is None else str(r.k)
        lines.append(f"{r.method:<13} {k:>7} {r.damping:>8g} {r.mean:>7.3f} {r.spread:>7.3f} "
                     f"{r.seconds:>7.2f}")
    return "\n".join(lines)


def save_figure(path: str, results: Sequence[Result], task: DigitsTask, scores: torch.Tensor,
                n_examples: int = 4, top: int = 5) -> None:
    """LDS against k per method (Identity dashed) and, for a few test images, their most
    helpful training images under `scores` (n_test, n_train)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 5))
    grid = fig.add_gridspec(n_examples, top + 3, width_ratios=[6, 0.3] + [1] * (top + 1))
    ax = fig.add_subplot(grid[:, 0])
    for method in dict.fromkeys(r.method for r in results):
        rows = [r for r in results if r.method == method]
        if method == "Identity":
            ax.axhline(rows[0].mean, color="k", ls="--", label="Identity (uncompressed)")
        else:
            ax.errorbar([r.k for r in rows], [r.mean for r in rows], [r.spread for r in rows],
                        marker="o", capsize=3, label=method)
    ks = sorted({r.k for r in results if r.k is not None})
    ax.set(xscale="log", xlabel="k per layer", ylabel="LDS", title="digits MLP: LDS against k")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    best = scores.topk(top, dim=1).indices
    for row in range(n_examples):
        images = [(task.x_test[row], f"test {row}")] + [
            (task.x_train[i], f"#{int(i)}") for i in best[row]]
        for col, (image, title) in enumerate(images):
            cell = fig.add_subplot(grid[row, col + 2])
            cell.imshow(image.reshape(8, 8).numpy(), cmap="gray_r")
            cell.set_title(title, fontsize=7)
            cell.axis("off")
    fig.suptitle("right: test images and their top training images (FactGraSS, largest k)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def demo(args: argparse.Namespace) -> None:
    setting = Setting.quick() if args.quick else Setting()
    if args.ks:
        setting.ks = tuple(args.ks)
    damping = DEFAULT_DAMPING if args.damping is None else args.damping
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    task, models, subsets, targets, accuracy = prepare(setting, args.out)
    print(f"digits MLP: {task.n_train} train / {task.y_test.shape[0]} test, "
          f"{len(models)} checkpoints, test accuracy {accuracy:.3f}; "
          f"{subsets.shape[0]} retrained subset models")
    results = sweep(task, models, subsets, targets, setting, METHODS, [damping])
    print(format_results(results))
    figure = os.path.join(args.out, "lds_vs_k.png")
    scores = ensemble_scores(task, models, "FactGraSS", max(setting.ks), damping=damping, seed=0)
    save_figure(figure, results, task, scores)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"setting": asdict(setting), "accuracy": accuracy,
                   "results": [asdict(r) for r in results]}, f, indent=1)
    print(f"saved {figure} and results.json; total {time.perf_counter() - t0:.0f} s")


def held_out_choice(results: Sequence[Result], fixed: float) -> tuple[float, float]:
    """Mean LDS on the odd test examples when the damping is chosen per (method, k, seed) by
    LDS on the even ones, and with the `fixed` damping instead: (auto, fixed)."""
    auto, static = [], []
    for key in dict.fromkeys((r.method, r.k) for r in results):
        grid = [r for r in results if (r.method, r.k) == key]
        for seed in range(len(grid[0].halves)):
            best = max(grid, key=lambda r: r.halves[seed][0])
            auto.append(best.halves[seed][1])
            static.extend(r.halves[seed][1] for r in grid if r.damping == fixed)
    return statistics.fmean(auto), statistics.fmean(static)


def damping_study(args: argparse.Namespace) -> None:
    setting = Setting.quick() if args.quick else Setting()
    if args.ks:
        setting.ks = tuple(args.ks)
    os.makedirs(args.out, exist_ok=True)
    task, models, subsets, targets, _ = prepare(setting, args.out)
    results = sweep(task, models, subsets, targets, setting, METHODS, DAMPING_GRID)
    print(format_results(results))
    print("\nmean LDS over all methods and k, by damping:")
    for d in DAMPING_GRID:
        print(f"  {d:>8g}: {statistics.fmean(r.mean for r in results if r.damping == d):.3f}")
    auto, fixed = held_out_choice(results, DEFAULT_DAMPING)
    print(f"held-out choice (damping picked per method, k and seed on the even test examples, "
          f"LDS on the odd ones): {auto:.3f}; fixed damping {DEFAULT_DAMPING:g}: {fixed:.3f}")
    with open(os.path.join(args.out, "damping.json"), "w") as f:
        json.dump([asdict(r) for r in results], f, indent=1)


def build_index(args: argparse.Namespace) -> None:
    from . import hf

    hf.init_distributed()
    options = {k: getattr(args, k) for k in (
        "text_field", "prompt_field", "completion_field", "max_length", "dtype", "compressor",
        "k", "layers", "hessian", "damping", "store_dtype", "batch_size", "seed")}
    attr = hf.build(args.model, args.data, args.out, truncate=not args.no_truncate, **options)
    print(f"index {args.out}: {attr.store.n_rows} documents, {attr.store.width} features per "
          f"document over {len(attr.store.layout)} layers")


def query_index(args: argparse.Namespace) -> None:
    from . import hf

    hits = hf.query(args.index, texts=args.text, data=args.data, top=args.top,
                    aggregate=args.aggregate, unit_normalize=args.unit_normalize,
                    model_dir=args.model)
    print(hf.format_hits(hits))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for hit in hits:
                f.write(json.dumps(hit) + "\n")
        print(f"wrote {len(hits)} hits to {args.out}")


def _add_lm_commands(sub) -> None:
    from .attributor import DEFAULT_DAMPING
    from .curvature import HESSIANS

    b = sub.add_parser("build", help="index the documents of a data file for a local model",
                       description="Index the documents of a data file for a local model.")
    b.set_defaults(run=build_index)
    b.add_argument("--model", required=True, help="save_pretrained model directory with its tokenizer")
    b.add_argument("--data", required=True,
                   help="jsonl / json / parquet / txt file or datasets.save_to_disk folder")
    b.add_argument("--out", required=True, help="index directory (a rerun resumes it)")
    b.add_argument("--text-field", default="text", help="field holding the documents (text)")
    b.add_argument("--prompt-field", help="field of the prompt (with --completion-field)")
    b.add_argument("--completion-field", help="field of the completion: only its tokens count")
    b.add_argument("--max-length", type=int, default=512, help="tokens per document (512)")
    b.add_argument("--no-truncate", action="store_true",
                   help="refuse documents longer than --max-length instead of truncating them")
    b.add_argument("--batch-size", type=int, default=8, help="documents per step (8)")
    b.add_argument("--dtype", default="fp32", choices=["bf16", "fp16", "fp32"],
                   help="model dtype (fp32); features accumulate in fp32")
    b.add_argument("--compressor", default="factgrass",
                   choices=["factgrass", "logra", "factsjlt", "grass", "sjlt", "randommask",
                            "gaussian", "identity"], help="compressor (factgrass)")
    b.add_argument("--k", type=int, default=4096, help="features per layer (4096)")
    b.add_argument("--layers", nargs="+",
                   help="fnmatch patterns of the linear layers to capture (default: all)")
    b.add_argument("--hessian", default="efim", choices=list(HESSIANS), help="curvature (efim)")
    b.add_argument("--damping", type=float, default=DEFAULT_DAMPING,
                   help=f"relative damping ({DEFAULT_DAMPING})")
    b.add_argument("--store-dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="dtype of the stored features (fp32)")
    b.add_argument("--seed", type=int, default=0, help="seed of the random maps (0)")
    b.add_argument("--threads", type=int, help="torch threads (default: torch's)")

    q = sub.add_parser("query", help="the training documents behind given texts",
                       description="The training documents behind given texts.")
    q.set_defaults(run=query_index)
    q.add_argument("index", help="index directory made by `grass build`")
    source = q.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="query file, read like the training data")
    source.add_argument("--text", action="append", help="a query text (repeatable)")
    q.add_argument("--out", help="JSONL of hits: query, rank, train, score, text")
    q.add_argument("--top", type=int, default=10, help="hits per query (10)")
    q.add_argument("--aggregate", choices=["mean"],
                   help="one query: the mean gradient of all queries")
    q.add_argument("--unit-normalize", action="store_true",
                   help="cosine scores (both sides unit-normalised under the curvature)")
    q.add_argument("--model", help="model directory (default: the one the index was built with)")
    q.add_argument("--threads", type=int, help="torch threads (default: torch's)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grass", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_lm_commands(sub)
    for name, fn, text in (("demo", demo, "LDS and time per method over a sweep of k, and a PNG"),
                           ("damping", damping_study, "LDS against relative damping")):
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(run=fn)
        p.add_argument("--out", default="grass_out", help="output folder (default ./grass_out)")
        p.add_argument("--quick", action="store_true", help="a reduced run (about 20 s)")
        p.add_argument("--ks", type=int, nargs="+", help="k per layer to sweep")
        p.add_argument("--threads", type=int, default=1,
                       help="torch threads (default 1: the models are tiny, threads only sync)")
        if name == "demo":
            p.add_argument("--damping", type=float,
                           help=f"relative damping (default: the Attributor's, {DEFAULT_DAMPING})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command not in ("build", "query"):
        args.run(args)
        return 0
    try:
        args.run(args)
    except ValueError as e:  # bad input: a message, not a traceback
        print(f"grass {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
