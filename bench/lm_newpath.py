"""LDS of the language-model benchmark (bench/lm.py) through the language-model path: a task loss
from grass.tasks, batches as a generator of dicts, an on-disk index reopened with
Attributor.load on a model reloaded from save_pretrained, test data as a datasets.Dataset.

    PYTHONPATH=$PWD:$PWD/python .venv/bin/python -m bench.lm_newpath

Same model, data, ground truth (bench/results/lm_groundtruth.npz, computed by bench.lm) and
compressor (FactGraSS k = 1024, efim) as bench.lm's first row, which is recomputed here side by
side through the tensor path (bench.lm_data.per_example_loss on a tensor of blocks). Writes
bench/results/lm_newpath.md.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

import grass
from grass.tasks import CausalLM

from .lm import FULL, FULL_ORDER_SEED, RESULTS, ground_truth
from .lm_data import load_blocks, per_example_loss, train
from .timing import ensure_malloc_env


def main() -> None:
    torch.set_num_threads(1)
    cfg = FULL.lm
    train_blocks, test_blocks = load_blocks(cfg)
    subsets, targets = ground_truth(FULL, train_blocks, test_blocks,
                                    RESULTS / "lm_groundtruth.npz", progress=True)
    model = train(cfg, train_blocks, order_seed=FULL_ORDER_SEED)
    compressor = grass.FactGraSS(k=FULL.k)

    tensor_path = grass.Attributor(model, per_example_loss, compressor,
                                   batch_size=cfg.batch_size, progress=False)
    tensor_path.cache(train_blocks)
    old = tensor_path.attribute(test_blocks)

    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(f"{tmp}/model")
        batches = ({"input_ids": b} for b in train_blocks.split(cfg.batch_size))
        grass.Attributor(model, CausalLM(), compressor, store=f"{tmp}/index",
                         progress=False).cache(batches, n_rows=len(train_blocks))
        reloaded = AutoModelForCausalLM.from_pretrained(f"{tmp}/model").eval()
        reopened = grass.Attributor.load(f"{tmp}/index", reloaded, CausalLM(),
                                         batch_size=cfg.batch_size, progress=False)
        new = reopened.attribute(Dataset.from_dict({"input_ids": test_blocks.tolist()}))

    rows = {"tensor path": grass.lds(old, subsets, targets),
            "language-model path": grass.lds(new, subsets, targets)}
    diff = float((new - old).norm() / old.norm())
    text = ("# LM benchmark LDS through the language-model path (bench/lm_newpath.py)\n\n"
            f"FactGraSS k={FULL.k}, efim, {cfg.n_train} train / {cfg.n_test} test blocks, "
            f"{FULL.n_subsets} subsets (bench/results/lm_groundtruth.npz).\n\n"
            "| path | LDS |\n|---|---|\n"
            + "".join(f"| {k} | {v:.4f} |\n" for k, v in rows.items())
            + f"\nRelative difference of the two score matrices (Frobenius): {diff:.2e}\n")
    print(text)
    (RESULTS / "lm_newpath.md").write_text(text)
    print(json.dumps(rows))


if __name__ == "__main__":
    ensure_malloc_env()
    main()
