"""Side-by-side peer comparison: grass vs dattri (and bergson) on one model, data and k.

Runs in the peers venv (bench/peers_setup.sh), never in the test suite:

    bash bench/peers_setup.sh
    PYTHONPATH=$PWD:$PWD/python .venv-peers/bin/python -m bench.peers

Model: a GPT-2-small-shaped model, GPT2Config(n_layer=2, n_embd=768, n_head=12,
vocab_size=1024, n_positions=128), random init, dropout off, batches of 4 x 128 tokens of Python
stdlib bytes. dattri hooks nn.Linear only, so GPT-2's Conv1D layers are swapped for the
equivalent nn.Linear (same weights, transposed). Every side captures the same 8 layers, the
4 linear layers of each block (bergson's default set; lm_head is tied to the embedding),
with their biases, at k = 4096 per layer (bergson: projection_dim 64 per side = 4096).

hessian = identity on every side: with eFIM at k = 4096 the end-to-end time of a small run is
dominated by inverting eight 4096 x 4096 matrices (dattri: ~7-15 s each here, Cholesky failing
and falling back to a direct inverse), which measures LAPACK, not gradient capture; and
bergson's collector builds no curvature at all.

Timed in one process, malloc thresholds set for all sides (bench.timing.ensure_malloc_env):
  * per layer: compressing one layer's (X, Delta) of a batch, mlp.c_fc (768 -> 3072, bias);
  * end to end: constructing the attributor and caching the training set,
    against a plain training step (forward + backward with weight gradients) on the same batches.
Results (ratios) go to bench/results/peers.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import grass
from grass.capture import layer_shape

from .lm_data import LMConfig, load_blocks
from .timing import ensure_malloc_env, format_table, measure

RESULTS = Path(__file__).resolve().parent / "results"
K = 4096
BATCH = 4
LAYER = "transformer.h.0.mlp.c_fc"
BLOCK_LAYERS = "transformer.h.*"


def linearize(model: nn.Module) -> nn.Module:
    """Replace every transformers Conv1D by the nn.Linear computing the same map (in place)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                d_in, d_out = child.weight.shape
                linear = nn.Linear(d_in, d_out)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
    return model


def make_model() -> nn.Module:
    config = GPT2Config(n_layer=2, n_embd=768, n_head=12, vocab_size=1024, n_positions=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return linearize(GPT2LMHeadModel(config)).eval()


def per_example_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy per sequence: ids (B, T) -> (B,)."""
    logits = model(input_ids=ids).logits[:, :-1]
    tok = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                      ids[:, 1:].reshape(-1), reduction="none")
    return tok.view(ids.shape[0], -1).mean(1)


# -- ours ----------------------------------------------------------------------------------------
def ours_cache(model, data, compressor) -> Callable[[], object]:
    def run():
        attr = grass.Attributor(model, per_example_loss, compressor, layers=BLOCK_LAYERS,
                                hessian="identity", batch_size=BATCH, progress=False)
        attr.cache(data)
    return run


def ours_layer(model, compressor, acts, grads) -> Callable[[], object]:
    layer_map = compressor.build(layer_shape(LAYER, model.get_submodule(LAYER)), seed=0)
    return lambda: layer_map(acts, grads)


# -- dattri --------------------------------------------------------------------------------------
_SCRATCH = tempfile.mkdtemp(prefix="grass-peers-")


def _dattri_attributor(model, cls_name: str, loader):
    from dattri import algorithm
    from dattri.task import AttributionTask

    def loss_func(m, batch, device):
        return per_example_loss(m, batch["input_ids"].to(device)).sum()

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    layers = [n for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and n.startswith("transformer.h.")]
    # dattri writes batch_metadata.json into cache_dir (default: the working directory).
    return getattr(algorithm, cls_name)(task, layer_names=layers, hessian="Identity",
                                        device="cpu", proj_dim=K, offload="cpu",
                                        cache_dir=_SCRATCH)


def _dattri_loader(data: torch.Tensor) -> DataLoader:
    """Dict batches: dattri runs a sample batch through the model as model(**batch) (a plain
    tensor batch would be cut to its first example)."""
    return DataLoader([{"input_ids": row} for row in data], batch_size=BATCH, shuffle=False)


def dattri_cache(model, data, cls_name: str) -> Callable[[], object]:
    loader = _dattri_loader(data)
    return lambda: _dattri_attributor(model, cls_name, loader).cache(loader)


def dattri_layer(model, data, cls_name: str, acts, grads) -> Callable[[], object]:
    from dattri.algorithm.block_projected_if.core.hook import _compute_compressed_grad

    loader = _dattri_loader(data)
    attr = _dattri_attributor(model, cls_name, loader)
    attr._setup_compressors(loader)
    compressor = attr.compressors[attr.layer_names.index(LAYER)]
    return lambda: _compute_compressed_grad(grad_output=grads, tensor_input=acts, has_bias=True,
                                            compressor=compressor)


# -- bergson -------------------------------------------------------------------------------------
def bergson_collect(model, data) -> Callable[[], object]:
    """bergson's collect_gradients into a fresh run directory (its on-disk index) per call."""
    from datasets import Dataset
    from bergson.collection import collect_gradients
    from bergson.config.config import IndexConfig
    from bergson.utils.worker_utils import processor_for

    ds = Dataset.from_dict({"input_ids": data.tolist(), "length": [data.shape[1]] * len(data)})
    batches = [list(range(i, min(i + BATCH, len(data)))) for i in range(0, len(data), BATCH)]

    def run():
        with tempfile.TemporaryDirectory() as tmp:
            cfg = IndexConfig(run_path=f"{tmp}/run", projection_dim=int(K ** 0.5),
                              include_bias=True, token_batch_size=BATCH * data.shape[1])
            collect_gradients(model=model, data=ds, processor=processor_for(cfg), cfg=cfg,
                              batches=batches)
    return run


# -- the comparison ------------------------------------------------------------------------------
def train_steps(model, data) -> Callable[[], object]:
    """Forward + backward with weight gradients over all batches (the 'plain training step')."""
    def run():
        for batch in data.split(BATCH):
            per_example_loss(model, batch).mean().backward()
        model.zero_grad(set_to_none=True)
    return run


def timed(label: str, make: Callable[[], Callable[[], object]], repeats: int, errors: dict):
    """Median seconds of the callable that ``make()`` builds, or None (error recorded)."""
    try:
        seconds = measure(make(), warmup=1, repeats=repeats)
        print(f"{label}: {seconds:.3f} s", flush=True)
        return seconds
    except Exception as exc:  # a peer that fails is reported, not fatal
        errors[label] = f"{type(exc).__name__}: {exc}".strip()[:600]
        traceback.print_exc()
        return None


def version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for every side (1: robust on the shared machine)")
    parser.add_argument("--out", type=Path, default=RESULTS / "peers.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = make_model()
    data, _ = load_blocks(LMConfig(n_train=args.n_train, n_test=0, block=128))
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(BATCH, 128, 768, generator=gen)
    grads = torch.randn(BATCH, 128, 3072, generator=gen)
    errors: dict[str, str] = {}
    r = args.repeats

    step = timed("train step", lambda: train_steps(model, data), r, errors)
    layer_rows, cache_rows = [], []
    for method, ours_comp, peer_cls in (("LoGra", grass.LoGra(k=K), "LoGraAttributor"),
                                        ("FactGraSS", grass.FactGraSS(k=K), "FactGraSSAttributor")):
        ours_l = timed(f"ours {method} layer", lambda: ours_layer(model, ours_comp, acts, grads), r, errors)
        peer_l = timed(f"dattri {peer_cls} layer",
                       lambda: dattri_layer(model, data, peer_cls, acts, grads), r, errors)
        ours_c = timed(f"ours {method} cache", lambda: ours_cache(model, data, ours_comp), r, errors)
        peer_c = timed(f"dattri {peer_cls}.cache", lambda: dattri_cache(model, data, peer_cls), r, errors)
        layer_rows.append(_row(method, f"dattri {peer_cls}", ours_l, peer_l, None))
        cache_rows.append(_row(method, f"dattri {peer_cls}.cache", ours_c, peer_c, step))
        if method == "LoGra":  # bergson's projection is LoGra-style (two-sided, per module)
            berg = timed("bergson collect_gradients", lambda: bergson_collect(model, data), r, errors)
            cache_rows.append(_row(method, "bergson collect_gradients", ours_c, berg, step))
    _write(args, layer_rows, cache_rows, errors)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b is not None else "n/a"


def _row(method, peer, ours, theirs, step) -> dict:
    row = {"method": method, "peer": peer, "speed-up (peer / ours)": _ratio(theirs, ours)}
    if step is not None:
        row["ours / train step"] = _ratio(ours, step)
        row["peer / train step"] = _ratio(theirs, step)
    return row


def _write(args, layer_rows, cache_rows, errors) -> None:
    setup = {"n_train": args.n_train, "batch": f"{BATCH}x128", "k_per_layer": K,
             "threads": torch.get_num_threads(), "repeats (median)": args.repeats,
             "torch": torch.__version__, "dattri": version("dattri"), "bergson": version("bergson")}
    text = ("# Peer comparison (bench/peers.py)\n\n"
            f"Setup: `{json.dumps(setup)}`; malloc thresholds set for every side.\n\n"
            f"## Per-layer compression ({LAYER}, one batch)\n\n" + format_table(layer_rows, list(layer_rows[0]))
            + "\n\n## End to end: construct + cache (hessian = identity)\n\n"
            + format_table(cache_rows, list(cache_rows[0])) + "\n")
    if errors:
        text += "\n## Errors\n\n" + "\n".join(f"- {k}: `{v}`" for k, v in errors.items()) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    ensure_malloc_env()
    main()
