"""Language-model benchmark: LDS and cache throughput of grass on a small GPT-2 over stdlib text.

    .venv/bin/python -m bench.lm            # full run (ground truth cached after the first run)
    .venv/bin/python -m bench.lm --quick    # tiny smoke run (what tests/test_lm_bench.py runs)

Pipeline: train a byte-level GPT-2 on blocks of the Python standard library (bench/lm_data.py);
retrain it on random 50% subsets and record each test block's loss (the LDS ground truth,
cached in <out>/lm_groundtruth.npz by grass.lds.subset_targets, so only the first run pays for
it); attribute the test blocks to the training blocks through every Linear/Conv1D layer with
FactGraSS, LoGra, FactSJLT and Identity; report LDS, cache throughput (tokens/s) and cache time
over the time of plain training steps (forward + backward with weight gradients) on the same
batches, measured in the same process.

Identity keeps every layer uncompressed (k_l up to 65k), where a dense k_l x k_l Fisher does not
fit; it runs with hessian="identity" (plain gradient inner products), and so do the compressed
methods in a second set of rows, so that Identity has a like-for-like comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import grass
from grass.lds import subset_targets

from .lm_data import LMConfig, evaluate, load_blocks, per_example_loss, train
from .timing import ensure_malloc_env, format_table

RESULTS = Path(__file__).resolve().parent / "results"
FULL_ORDER_SEED = 10**6  # batch order of the full model: distinct from every subset's seed


@dataclasses.dataclass(frozen=True)
class Setting:
    """One benchmark size: the data/model/training config, subsets and features per layer."""

    lm: LMConfig
    n_subsets: int
    k: int


FULL = Setting(LMConfig(n_train=512, n_test=64, epochs=3), n_subsets=32, k=1024)
QUICK = Setting(
    LMConfig(n_train=24, n_test=6, block=32, n_layer=1, n_embd=32, n_head=2, epochs=1, batch_size=8),
    n_subsets=4, k=64,
)


def methods(k: int) -> list[tuple[str, grass.Compressor, str]]:
    """(label, compressor, hessian) for every row of the table."""
    compressed = [("FactGraSS", grass.FactGraSS(k=k)), ("LoGra", grass.LoGra(k=k)),
                  ("FactSJLT", grass.FactSJLT(k=k))]
    rows = [(f"{name} k={k}", comp, "efim") for name, comp in compressed]
    rows += [(f"{name} k={k}", comp, "identity") for name, comp in compressed]
    return rows + [("Identity", grass.Identity(), "identity")]


def ground_truth(setting: Setting, train_blocks, test_blocks, cache: Path, progress: bool):
    """Subsets (n_subsets, n_train) bool and targets (n_subsets, n_test): minus each test
    block's loss under the model retrained on that subset (higher = better, as LDS expects)."""
    def retrain(subsets: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        # The seed orders the batches; the initialisation is the full model's (init_seed), so
        # the targets vary with the data, not with the init (less noise for 32 subsets).
        return torch.stack([
            -evaluate(train(setting.lm, train_blocks[subset], order_seed=seed), test_blocks)
            for subset, seed in zip(subsets, seeds)
        ])

    return subset_targets(retrain, setting.lm.n_train, n_subsets=setting.n_subsets, cache=cache,
                          config=dataclasses.asdict(setting.lm), progress=progress)


def train_step_seconds(model, batches) -> float:
    """Seconds for forward + backward (with weight gradients) over all ``batches``."""
    start = time.perf_counter()
    for batch in batches:
        per_example_loss(model, batch).mean().backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def run(setting: Setting, out_dir: Path, *, progress: bool = True) -> list[dict]:
    """Run the benchmark; write lm.md, lm.json and lm_lds.png into ``out_dir``; return rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = setting.lm
    train_blocks, test_blocks = load_blocks(cfg)

    t0 = time.perf_counter()
    subsets, targets = ground_truth(setting, train_blocks, test_blocks,
                                    out_dir / "lm_groundtruth.npz", progress)
    truth_s = time.perf_counter() - t0
    model = train(cfg, train_blocks, order_seed=FULL_ORDER_SEED)
    batches = train_blocks.split(cfg.batch_size)
    train_step_seconds(model, batches[:1])  # warm-up: first-call allocations
    step_s = train_step_seconds(model, batches)
    tokens = train_blocks.numel()

    rows = []
    for label, compressor, hessian in methods(setting.k):
        attr = grass.Attributor(model, per_example_loss, compressor, hessian=hessian,
                                batch_size=cfg.batch_size, progress=False)
        start = time.perf_counter()
        attr.cache(train_blocks)
        cache_s = time.perf_counter() - start
        scores = attr.attribute(test_blocks)
        rows.append({
            "method": label, "hessian": hessian,
            "features/example": sum(attr.layer_sizes.values()),
            "LDS": round(grass.lds(scores, subsets, targets), 4),
            "cache tokens/s": round(tokens / cache_s),
            "cache / train step": round(cache_s / step_s, 3),
        })
        print(f"{label} ({hessian}): LDS {rows[-1]['LDS']}, {cache_s:.1f} s cache", flush=True)
    print(format_table(rows, list(rows[0])))
    _write(rows, setting, out_dir, truth_s=truth_s, step_s=step_s, tokens=tokens)
    return rows


def _write(rows: list[dict], setting: Setting, out_dir: Path, *, truth_s: float, step_s: float,
           tokens: int) -> None:
    """lm.json (everything), lm.md (the table and the setup), lm_lds.png (LDS per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = {"config": dataclasses.asdict(setting.lm), "n_subsets": setting.n_subsets,
            "k_per_layer": setting.k, "threads": torch.get_num_threads(),
            "ground_truth_seconds_this_run": round(truth_s, 1),
            "train_step_tokens_per_s": round(tokens / step_s)}
    (out_dir / "lm.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    table = format_table(rows, list(rows[0]))
    (out_dir / "lm.md").write_text(
        "# Language-model benchmark (bench/lm.py)\n\n"
        f"Byte-level GPT-2 on Python stdlib blocks; setup: `{json.dumps(meta)}`.\n"
        "LDS: Spearman over subsets of summed scores vs minus the retrained model's test loss, "
        "mean over test blocks. 'cache / train step': time of Attributor.cache (features + "
        "Fisher) over forward+backward with weight gradients on the same batches, same process, "
        "malloc thresholds set for both.\n\n" + table + "\n")
    fig, ax = plt.subplots(figsize=(8, 4))
    colors = ["tab:blue" if r["hessian"] == "efim" else "tab:gray" for r in rows]
    ax.barh([f'{r["method"]} ({r["hessian"]})' for r in rows], [r["LDS"] for r in rows],
            color=colors)
    ax.set_xlabel(f"LDS ({setting.n_subsets} retrained 50% subsets)")
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
    run(QUICK if args.quick else FULL, args.out_dir, progress=not args.quick)


if __name__ == "__main__":
    ensure_malloc_env()
    main()
