"""Cost of ``Attributor.cache`` against a plain training step, side by side in one process.

Model: transformers GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=768, n_head=12,
vocab_size=1024, n_positions=128)), random weights, dropout off; batches of 4 x 128 tokens.
Every nn.Linear / Conv1D is captured (9 layers: 4 per block + lm_head) at k = 4096 per layer.

    training step = forward + backward of the mean loss with weight gradients (no optimizer)
    cache         = Attributor.cache over the same batches (in-memory store), per batch;
                    hessian="identity": the one-time Fisher factorisation is timed apart
                    (an efim cache of one batch: capture + 9 Cholesky factorisations of 4096^2)

The malloc thresholds of bench.timing.ensure_malloc_env are set for both sides (the process re-executes).

    .venv/bin/python -m bench.attributor [--batches 4] [--repeats 5]

``--damping`` instead measures LDS against the relative damping on the digits benchmark
(grass.demo.digits, 1000 train / 100 test, 3 checkpoints, 50 retrained half subsets; the ground truth
is cached in bench/results/digits_lds.npz): the evidence behind grass's DEFAULT_DAMPING.

    .venv/bin/python -m bench.attributor --damping

``--fisher`` compares, with 95% bootstrap intervals over 500 test examples (100 retrained half
subsets, cached in bench/results/digits_fisher_lds.npz): hessian="efim" against "fisher", relative
damping against absolute damping equal to the training weight decay, one checkpoint against
grass.Ensemble of three; it writes bench/results/digits_fisher.md.

    .venv/bin/python -m bench.attributor --fisher
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from bench.timing import ensure_malloc_env, format_table, measure


def gpt2_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=768, n_head=12, vocab_size=1024, n_positions=128,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def lm_loss(model, batch) -> torch.Tensor:
    """Per-example mean next-token cross-entropy: (B,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["input_ids"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
    mask = batch["attention_mask"][:, 1:].float()
    return (losses * mask).sum(1) / mask.sum(1)


DAMPINGS = (1e-4, 1e-3, 1e-2, 0.1, 0.3, 0.5, 1.0, 10.0)


def damping_sweep() -> None:
    """LDS per compressor and relative damping on digits, averaged over 3 checkpoints."""
    import grass
    from grass.demo.digits import load_digits, per_example_loss
    from grass.demo.retrain import subset_targets

    task = load_digits()
    models = task.ensemble(3)

    def evaluate(subsets, seeds):
        return torch.stack([task.test_margins(m) for m in task.train_many(subsets, seeds)])

    subsets, targets = subset_targets(evaluate, task.n_train, n_subsets=50,
                                      cache="bench/results/digits_lds.npz")
    train, test = (task.x_train, task.y_train), (task.x_test, task.y_test)

    def scores(model, compressor, damping):
        attr = grass.Attributor(model, per_example_loss, compressor, damping=damping,
                                batch_size=500, progress=False)
        attr.cache(train)
        return attr.attribute(test)

    rows = []
    for compressor in (grass.Identity(), grass.FactGraSS(k=64), grass.LoGra(k=64),
                       grass.FactSJLT(k=64), grass.FactGraSS(k=256), grass.LoGra(k=256)):
        row = {"compressor": f"{type(compressor).__name__}({getattr(compressor, 'k', '')})"}
        for damping in DAMPINGS:
            total = sum(scores(m, compressor, damping) for m in models)
            row[f"{damping:g}"] = f"{grass.lds(total, subsets, targets):.3f}"
        rows.append(row)
    print("LDS against relative damping (digits MLP, 3 checkpoints, 50 subsets)")
    print(format_table(rows, list(rows[0])))


def fisher_study(n_test: int = 500, n_subsets: int = 100) -> None:
    """LDS with bootstrap intervals on digits: efim against fisher, relative against absolute
    damping (= the training weight decay), one checkpoint against an ensemble of three."""
    import grass
    from grass.demo.digits import load_digits, per_example_loss, sampled_label_loss
    from grass.demo.retrain import subset_targets
    from grass.lds import lds_per_example

    from bench.lds_table import lds_tables

    task = load_digits(n_test=n_test)
    models = task.ensemble(3, seed=10_000)

    def evaluate(subsets, seeds):
        return torch.stack([task.test_margins(m) for m in task.train_many(subsets, seeds)])

    recipe = {"n_train": task.n_train, "n_test": n_test, "epochs": task.epochs, "lr": task.lr,
              "weight_decay": task.weight_decay, "hidden": task.hidden}
    subsets, targets = subset_targets(evaluate, task.n_train, n_subsets=n_subsets, batch=25,
                                      cache="bench/results/digits_fisher_lds.npz", config=recipe)
    train, test = (task.x_train, task.y_train), (task.x_test, task.y_test)
    wd = task.weight_decay

    def scores(compressor, members: int, **options):
        ensemble = grass.Ensemble([
            grass.Attributor(m, per_example_loss, compressor, fisher_loss_fn=sampled_label_loss,
                             batch_size=100, progress=False, **options) for m in models[:members]])
        ensemble.cache(train)
        return ensemble.attribute(test)

    configs = {
        "efim rel 0.5": {"hessian": "efim"},
        "fisher rel 0.5 S=4": {"hessian": "fisher", "fisher_samples": 4},
        "fisher rel 0.5 S=1": {"hessian": "fisher", "fisher_samples": 1},
        "fisher rel 0.5 S=16": {"hessian": "fisher", "fisher_samples": 16},
        f"efim abs {wd:g} (weight decay)": {"hessian": "efim", "absolute_damping": wd},
        f"fisher abs {wd:g} (weight decay) S=4": {"hessian": "fisher", "absolute_damping": wd,
                                                   "fisher_samples": 4},
        f"fisher abs {wd:g} (weight decay) S=16": {"hessian": "fisher", "absolute_damping": wd,
                                                    "fisher_samples": 16},
        "efim rel 0.05": {"hessian": "efim", "damping": 0.05},
        "fisher rel 0.05 S=4": {"hessian": "fisher", "damping": 0.05, "fisher_samples": 4},
    }
    per_example, pairs = {}, []
    for compressor in (grass.Identity(), grass.FactGraSS(k=64), grass.LoGra(k=64)):
        name = type(compressor).__name__ + (f"({compressor.k})" if hasattr(compressor, "k") else "")
        for members in (1, 3):
            for label, options in configs.items():
                if members == 3 and label not in ("efim rel 0.5", "fisher rel 0.5 S=4"):
                    continue
                row = f"{name} {label}" + (" x3 ckpts" if members > 1 else "")
                per_example[row] = lds_per_example(scores(compressor, members, **options),
                                                   subsets, targets)
                print(f"{row}: {float(per_example[row].nanmean()):.4f}", flush=True)
        single = [f"{name} {label}" for label in configs]
        pairs += [(single[1], single[0]), (single[3], single[2]), (single[4], single[0]),
                  (single[5], single[1]), (f"{single[0]} x3 ckpts", single[0]),
                  (f"{single[1]} x3 ckpts", single[1])]
    rows, differences = lds_tables(per_example, pairs)
    text = (f"digits MLP ({task.n_train} train / {n_test} test, weight decay {wd:g}), {n_subsets} "
            "retrained half subsets, LDS on test margins with 95% bootstrap intervals over test "
            "examples; checkpoint 0 alone or the mean over 3 (grass.Ensemble)\n\n"
            + format_table(rows, list(rows[0])) + "\n\nPaired differences:\n\n"
            + format_table(differences, list(differences[0])) + "\n")
    print(text)
    with open("bench/results/digits_fisher.md", "w") as f:
        f.write("# Digits: efim vs fisher, relative vs absolute damping, ensembles "
                "(python -m bench.attributor --fisher)\n\n" + text)


def main() -> None:
    ensure_malloc_env()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--damping", action="store_true", help="run the LDS damping sweep")
    parser.add_argument("--fisher", action="store_true",
                        help="LDS with intervals: efim vs fisher, damping kinds, ensembles")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.fisher:
        torch.set_num_threads(1)
        fisher_study()
        return
    if args.damping:
        damping_sweep()
        return

    import grass

    model = gpt2_model()
    n = 4 * args.batches
    ids = torch.randint(0, 1024, (n, 128), generator=torch.Generator().manual_seed(1))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batches = [{k: v[i:i + 4] for k, v in data.items()} for i in range(0, n, 4)]

    def train_steps():
        for batch in batches:
            model.zero_grad(set_to_none=True)
            lm_loss(model, batch).mean().backward()

    compressors = (grass.FactGraSS(k=args.k), grass.LoGra(k=args.k), grass.FactSJLT(k=args.k))
    attrs = [grass.Attributor(model, lm_loss, c, hessian="identity", batch_size=4,
                              progress=False) for c in compressors]
    measure(train_steps, warmup=1, repeats=1)
    for attr in attrs:
        measure(lambda: attr.cache(data), warmup=1, repeats=1)
    # Rounds that time every side once, back to back: load from other processes on this shared
    # machine then hits a round's sides alike, and the ratio is taken within each round.
    ratios = [[] for _ in attrs]
    times = [[] for _ in attrs]
    train_times = []
    for _ in range(args.repeats):
        train = measure(train_steps, warmup=0, repeats=1) / args.batches
        train_times.append(train)
        for i, attr in enumerate(attrs):
            cache = measure(lambda: attr.cache(data), warmup=0, repeats=1) / args.batches
            times[i].append(cache)
            ratios[i].append(cache / train)
    rows = []
    for compressor, ratio, cache in zip(compressors, ratios, times):
        model.zero_grad(set_to_none=True)
        efim = grass.Attributor(model, lm_loss, compressor, batch_size=4, progress=False)
        t0 = time.perf_counter()
        efim.cache(batches[0])
        rows.append({
            "compressor": type(compressor).__name__,
            "k per layer": args.k,
            "cache / train step (median)": f"{statistics.median(ratio):.2f}",
            "range over rounds": f"{min(ratio):.2f}-{max(ratio):.2f}",
            "cache per batch (s)": f"{statistics.median(cache):.3f}",
            "efim cache of 1 batch (s)": f"{time.perf_counter() - t0:.1f}",
        })
    print(f"GPT-2 (2 layers, d=768, vocab 1024), batch 4x128, {len(attrs[0].layers)} captured "
          f"layers, {args.batches} batches per timing, {args.repeats} rounds, train step median "
          f"{statistics.median(train_times):.3f} s, malloc thresholds set")
    print(format_table(rows, list(rows[0])))

if __name__ == "__main__":
    main()
