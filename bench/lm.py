"""Language-model benchmark: LDS and cache throughput of grass on a small GPT-2 over stdlib text.

    .venv/bin/python -m bench.lm            # full run (ground truth cached after the first run)
    .venv/bin/python -m bench.lm --quick    # tiny smoke run (what tests/test_lm_bench.py runs)

Pipeline: train a byte-level GPT-2 on blocks of the Python standard library (bench/lm_data.py);
retrain it on random 50% subsets, each with several batch orders whose test losses are averaged
(the LDS ground truth, cached in <out>/lm_groundtruth.npz by grass.demo.retrain.subset_targets,
so only the first run pays for it); attribute the test blocks to the training blocks through every
Linear/Conv1D layer with each method of ``methods``: efim against fisher (targets sampled from
the model, S draws), relative against absolute damping, one checkpoint against the mean over
several, the compressors, and uncompressed gradients. LDS per test block gives each method a
bootstrap interval and each listed pair of methods a paired interval of their difference.
Capture (features into the store) and curvature (Fisher + factorisation on the complete store)
are timed apart, after a warm-up, against plain training steps on the same batches.

Identity keeps every layer uncompressed (k_l up to 16k), where a dense k_l x k_l Fisher does not
fit; it runs with hessian="identity" (plain inner products), and so does FactGraSS in one row,
so that Identity has a like-for-like comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import grass
import grass.distributed
from grass.attributor import DEFAULT_DAMPING, DEFAULT_FISHER_SAMPLES
from grass.demo.retrain import subset_targets
from grass.lds import lds_per_example

from .lds_table import lds_tables
from .lm_data import LMConfig, evaluate, load_blocks, per_example_loss, sampled_token_loss, train
from .timing import ensure_malloc_env, format_table

RESULTS = Path(__file__).resolve().parent / "results"
FULL_ORDER_SEED = 10**6  # batch order of the full model: distinct from every subset's seed


@dataclasses.dataclass(frozen=True)
class Setting:
    """One benchmark size: the data/model/training config, subsets and features per layer."""

    lm: LMConfig
    n_subsets: int
    k: int
    train_seeds: int = 1  # retrainings per subset (batch orders) whose test losses are averaged
    fisher_samples: int = DEFAULT_FISHER_SAMPLES  # draws of the main fisher rows


FULL = Setting(LMConfig(n_train=512, n_test=256, block=64, n_embd=64, epochs=3),
               n_subsets=128, k=256, train_seeds=2)
QUICK = Setting(
    LMConfig(n_train=24, n_test=6, block=32, n_layer=1, n_embd=32, n_head=2, epochs=1, batch_size=8),
    n_subsets=4, k=64, train_seeds=2, fisher_samples=2,
)


def ground_truth(setting: Setting, train_blocks, test_blocks, cache: Path, progress: bool):
    """Subsets (n_subsets, n_train) bool and targets (n_subsets, n_test): minus each test
    block's loss under the model retrained on that subset (higher = better, as LDS expects)."""
    runs = setting.train_seeds

    def retrain(subsets: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        # Subset s is trained `runs` times with batch orders s*runs .. s*runs+runs-1 and the test
        # losses are averaged: the target then varies with the data more than with the order.
        # The initialisation is the full model's (init_seed) for every run.
        return torch.stack([
            -torch.stack([evaluate(train(setting.lm, train_blocks[subset], order_seed=seed * runs + r),
                                   test_blocks) for r in range(runs)]).mean(0)
            for subset, seed in zip(subsets, seeds)
        ])

    config = {**dataclasses.asdict(setting.lm), "train_seeds": runs}
    return subset_targets(retrain, setting.lm.n_train, n_subsets=setting.n_subsets, cache=cache,
                          config=config, progress=progress, batch=8)


@dataclasses.dataclass(frozen=True)
class Method:
    """One row: a compressor with a Hessian and a damping, over ``members`` checkpoints."""

    compressor: str  # a grass compressor class name
    hessian: str
    damping: float | None = None  # relative; None: the Attributor's default
    absolute: float | None = None  # absolute damping, as a multiple of the curvature scale
    samples: int = DEFAULT_FISHER_SAMPLES
    members: int = 1

    @property
    def label(self) -> str:
        damping = (f"abs {self.absolute:g}s" if self.absolute is not None
                   else f"rel {DEFAULT_DAMPING if self.damping is None else self.damping:g}")
        parts = [self.compressor, self.hessian]
        if self.hessian != "identity":
            parts.append(damping)
        if self.hessian == "fisher":
            parts.append(f"S={self.samples}")
        if self.members > 1:
            parts.append(f"x{self.members} ckpts")
        return " ".join(parts)


def methods(members: int, samples: int = DEFAULT_FISHER_SAMPLES) -> list[Method]:
    """Every row of the table: efim against fisher (``samples`` draws, and 1 and 4), relative
    against absolute damping, single checkpoints against ensembles, the compressors, and
    uncompressed gradients."""
    fg = "FactGraSS"

    def fisher(compressor: str = fg, **options) -> Method:
        return Method(compressor, "fisher", **{"samples": samples, **options})

    return [
        Method(fg, "efim"), fisher(), fisher(samples=1), fisher(samples=4),
        Method(fg, "efim", absolute=0.05), Method(fg, "efim", absolute=0.5),
        Method(fg, "efim", absolute=5.0),
        fisher(absolute=0.05), fisher(absolute=0.5), fisher(absolute=5.0),
        Method(fg, "efim", damping=0.05), fisher(damping=0.05),
        Method("LoGra", "efim"), fisher("LoGra"), Method("FactSJLT", "efim"),
        Method(fg, "identity"), Method("Identity", "identity"),
        Method(fg, "efim", members=members), fisher(members=members),
    ]


# Differences whose bootstrap interval is reported: (a, b) means LDS(a) - LDS(b).
def comparisons(members: int, samples: int = DEFAULT_FISHER_SAMPLES) -> list[tuple[Method, Method]]:
    fg = "FactGraSS"

    def fisher(compressor: str = fg, **options) -> Method:
        return Method(compressor, "fisher", **{"samples": samples, **options})

    return [
        (fisher(), Method(fg, "efim")),
        (fisher("LoGra"), Method("LoGra", "efim")),
        (fisher(damping=0.05), Method(fg, "efim", damping=0.05)),
        (fisher(), fisher(samples=1)),
        (fisher(), fisher(samples=4)),
        (Method(fg, "efim", absolute=0.5), Method(fg, "efim")),
        (fisher(absolute=0.5), fisher()),
        (Method(fg, "efim", members=members), Method(fg, "efim")),
        (fisher(members=members), fisher()),
        (Method(fg, "efim"), Method(fg, "identity")),
        (Method("Identity", "identity"), Method(fg, "identity")),
        (Method("LoGra", "efim"), Method(fg, "efim")),
    ]


def train_step_seconds(model, batches) -> float:
    """Seconds for forward + backward (with weight gradients) over all ``batches``."""
    start = time.perf_counter()
    for batch in batches:
        per_example_loss(model, batch).mean().backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


class Runner:
    """Attributors over one store per (compressor, checkpoint) in ``root``: capture runs once per
    store (timed after a warm-up), and every Hessian and damping reuses the rows, so an
    Attributor.cache on a complete store times the curvature alone. Each timed call is framed by
    two timed training epochs (``train_epoch_s``): its ratio is over their mean, so that load
    from other processes hits both sides alike."""

    def __init__(self, setting: Setting, models, train_blocks, test_blocks, root: Path):
        self.setting, self.models, self.root = setting, models, root
        self.train_blocks, self.test_blocks = train_blocks, test_blocks
        self.batches = train_blocks.split(setting.lm.batch_size)
        train_step_seconds(models[0], self.batches[:1])  # warm-up: first-call allocations
        self.timings: dict[str, tuple[str, float, float]] = {}  # label -> (part, s, s / epoch)
        self.scale: dict[str, float] = {}  # compressor -> mean over layers of tr(F_l) / k_l
        self._test: dict[tuple[str, int], grass.Features] = {}

    def _attributor(self, compressor: str, member: int, **options) -> grass.Attributor:
        k = {} if compressor == "Identity" else {"k": self.setting.k}
        return grass.Attributor(
            self.models[member], per_example_loss, getattr(grass, compressor)(**k),
            fisher_loss_fn=sampled_token_loss, store=self.root / f"{compressor}-{member}",
            batch_size=self.setting.lm.batch_size, progress=False, **options)

    def _features(self, compressor: str, member: int) -> grass.Features:
        """Capture the train rows into the store (timed for member 0) and the test features."""
        key = (compressor, member)
        if key not in self._test:
            attr = self._attributor(compressor, member, hessian="identity")
            attr.features(self.train_blocks[:self.setting.lm.batch_size])  # warm-up
            self._framed(lambda: attr.cache(self.train_blocks), member == 0, compressor, "capture")
            self._test[key] = attr.features(self.test_blocks)
        return self._test[key]

    def _framed(self, fn, timed: bool, label: str, part: str) -> None:
        """Run ``fn``; when ``timed``, record its seconds and their ratio to a training epoch
        (forward + backward with weight gradients over the same batches) timed just before and
        just after it."""
        if not timed:
            fn()
            return
        before = train_step_seconds(self.models[0], self.batches)
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        after = train_step_seconds(self.models[0], self.batches)
        self.timings[label] = (part, seconds, seconds / ((before + after) / 2))

    def _curvature_scale(self, compressor: str) -> float:
        if compressor not in self.scale:
            attr = self._attributor(compressor, 0, hessian="identity")
            store = attr.cache(self.train_blocks)
            fishers = grass.distributed.fisher(store)
            self.scale[compressor] = statistics.fmean(
                float(f.diagonal().mean()) for f in fishers.values())
        return self.scale[compressor]

    def scores(self, method: Method) -> torch.Tensor:
        """(n_test, n_train) scores of ``method``, averaged over its checkpoints."""
        options: dict = {"hessian": method.hessian, "fisher_samples": method.samples}
        if method.absolute is not None:
            options["absolute_damping"] = method.absolute * self._curvature_scale(method.compressor)
        elif method.damping is not None:
            options["damping"] = method.damping
        members, tests = [], []
        for member in range(method.members):
            tests.append(self._features(method.compressor, member))
            attr = self._attributor(method.compressor, member, **options)
            curvature = f"{method.compressor} {method.hessian}" + (
                f" S={method.samples}" if method.hessian == "fisher" else "")
            timed = member == 0 and method.hessian != "identity" and curvature not in self.timings
            # The rows are stored: this is the curvature alone.
            self._framed(lambda: attr.cache(self.train_blocks), timed, curvature, "curvature")
            members.append(attr)
        if len(members) == 1:
            return members[0].attribute(tests[0])
        return torch.stack([m.attribute(t) for m, t in zip(members, tests)]).mean(0)


def run(setting: Setting, out_dir: Path, *, progress: bool = True, members: int = 3) -> dict:
    """Run the benchmark; write lm.md, lm.json and lm_lds.png into ``out_dir``; return the
    results: rows (LDS with its interval per method), differences, timings, meta."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = setting.lm
    train_blocks, test_blocks = load_blocks(cfg)

    t0 = time.perf_counter()
    subsets, targets = ground_truth(setting, train_blocks, test_blocks,
                                    out_dir / "lm_groundtruth.npz", progress)
    truth_s = time.perf_counter() - t0
    # The checkpoints of an ensemble differ in batch order only, like the retrained models.
    models = [train(cfg, train_blocks, order_seed=FULL_ORDER_SEED + m) for m in range(members)]

    per_example = {}
    with tempfile.TemporaryDirectory(prefix="grass-lm-") as root:
        runner = Runner(setting, models, train_blocks, test_blocks, Path(root))
        for method in tqdm(methods(members, setting.fisher_samples), desc="methods",
                           disable=not progress):
            values = lds_per_example(runner.scores(method), subsets, targets)
            per_example[method.label] = values
            if progress:
                tqdm.write(f"{method.label}: LDS {float(values.nanmean()):.4f}")
    pairs = [(a.label, b.label) for a, b in comparisons(members, setting.fisher_samples)]
    rows, differences = lds_tables(per_example, pairs)
    tokens = train_blocks.numel()
    timings = [{"timed": label, "part": part, "seconds": round(s, 4),
                "over a training epoch": round(ratio, 4), "tokens/s": round(tokens / s)}
               for label, (part, s, ratio) in runner.timings.items()]
    meta = {"config": dataclasses.asdict(cfg), "n_subsets": setting.n_subsets,
            "train_seeds_per_subset": setting.train_seeds, "k_per_layer": setting.k,
            "checkpoints": members, "threads": torch.get_num_threads(),
            "ground_truth_seconds_this_run": round(truth_s, 1),
            "curvature_scale": {c: float(f"{v:.4g}") for c, v in runner.scale.items()},
            "test_examples_used": int((~torch.stack(list(per_example.values())).isnan().any(0)).sum())}
    results = {"meta": meta, "rows": rows, "differences": differences, "timings": timings}
    print(format_table(rows, list(rows[0])))
    print(format_table(differences, list(differences[0])))
    _write(results, setting, out_dir)
    return results


def _write(results: dict, setting: Setting, out_dir: Path) -> None:
    """lm.json (everything), lm.md (the tables and the setup), lm_lds.png (LDS with intervals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out_dir / "lm.json").write_text(json.dumps(results, indent=1) + "\n")
    rows, timings = results["rows"], results["timings"]
    (out_dir / "lm.md").write_text(
        "# Language-model benchmark (bench/lm.py)\n\n"
        f"Byte-level GPT-2 on Python stdlib blocks; setup: `{json.dumps(results['meta'])}`.\n\n"
        "LDS: per test block, the Spearman correlation over retrained subsets of the summed "
        "scores with minus the test loss (averaged over the subset's training seeds); the mean "
        "over test blocks with a 95% percentile bootstrap interval over test blocks (2000 "
        "resamples). 'abs c s': absolute damping c times the curvature scale s (the mean over "
        "layers of tr(F_l)/k_l of the efim, in meta); 'rel': relative damping; S: fisher draws "
        "per example; 'xN ckpts': scores averaged over N checkpoints (grass.Ensemble style).\n\n"
        + format_table(rows, list(rows[0])) + "\n\n"
        "Paired differences (same bootstrap resamples; significant when the interval excludes 0):"
        "\n\n" + format_table(results["differences"], list(results["differences"][0])) + "\n\n"
        "Time: capture (features into the store, after a warm-up call) and curvature alone "
        "(Attributor.cache on the complete store: Fisher sums + Cholesky; for fisher the S "
        "sampled capture passes), each over one epoch of the training batches, measured once "
        "and divided by the mean of a training epoch (forward + backward with weight gradients, "
        "same batches) timed just before and just after it; malloc thresholds set for all.\n\n"
        + format_table(timings, list(timings[0])) + "\n")
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(rows) + 1.5))
    means = [r["LDS"] for r in rows]
    half = [r["CI half-width"] for r in rows]
    ax.barh([r["method"] for r in rows], means, xerr=half, capsize=3, color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel(f"LDS ({setting.n_subsets} subsets x {setting.train_seeds} seeds), 95% CI")
    ax.set_title("GPT-2 (bytes, stdlib text): LDS per method")
    fig.tight_layout()
    fig.savefig(out_dir / "lm_lds.png", dpi=120)
    plt.close(fig)

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    # One thread by default: on these shared 2-core machines, two OpenMP threads under load
    # ran a training step ~10x slower than one (measured), which would swamp every ratio.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run(QUICK if args.quick else FULL, args.out_dir, progress=not args.quick,
        members=2 if args.quick else 3)


if __name__ == "__main__":
    ensure_malloc_env()
    main()
