"""Peak curvature memory per rank with the curvature sharded by layer, for 1, 2 and 4 ranks.

A store of ``--rows`` rows is built once for an MLP of ``--layers`` nn.Linear(d, d) layers
with FactGraSS(k) (k_l = k for every layer). Then for each world size, real gloo ranks on this
machine open it with its saved curvature removed, so that ``cache`` accumulates and saves each
rank's own layers, and ``self_influence`` factorises them and scores every row. Per rank:
the bytes of the curvature tensors it holds (Fisher fp32 + Cholesky factor fp64 of its own
layers), and its peak RSS during that phase above its RSS before it (VmHWM, reset through
/proc/self/clear_refs; it includes the pages of rows.bin that the rank reads, the same at
every world size). CPU only; the machine was shared with other jobs.

    python -m bench.sharded_curvature [--layers 24] [--width 64] [--k 1024] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile

import torch
from torch import nn

import grass
from bench.ranks import free_port, gloo_group, launch
from bench.timing import format_table, report


def _model(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(m for _ in range(layers) for m in (nn.Linear(width, width), nn.Tanh())))


def _loss(model, batch):
    return model(batch[0]).pow(2).mean(1)


def _data(rows: int, width: int):
    return (torch.randn(rows, width, generator=torch.Generator().manual_seed(1)),)


def _attributor(args, store) -> grass.Attributor:
    return grass.Attributor(_model(args.layers, args.width), _loss, grass.FactGraSS(k=args.k),
                            store=store, batch_size=64, chunk_size=256, progress=False)


def _status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _rank(rank: int, world: int, port: int, args, store: str, out: str) -> None:
    with gloo_group(rank, world, port, timeout_s=600):
        attr = _attributor(args, store)
        data = _data(args.rows, args.width)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        before = _status("VmRSS")
        attr.cache(data)
        attr.self_influence()
        peak = _status("VmHWM") - before
        scorer = attr._scorer_checked()
        factors = getattr(scorer, "owned", scorer.precondition).factors  # a plain Scorer at 1
        held = sum(f.numel() * f.element_size() + factors[n].numel() * factors[n].element_size()
                   for n, f in attr._fishers.items())
        with open(os.path.join(out, f"{world}.{rank}.json"), "w") as f:
            json.dump({"layers": len(factors), "held": held, "peak": peak}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store, out = os.path.join(tmp, "store"), os.path.join(tmp, "out")
        os.makedirs(out)
        _attributor(args, store).cache(_data(args.rows, args.width))
        rows = []
        for world in map(int, args.worlds.split(",")):
            for path in glob.glob(os.path.join(store, "arrays", "efim.*")):
                os.remove(path)  # every world size accumulates and factorises afresh
            launch(_rank, world, (world, free_port(), args, store, out), timeout_s=1800)
            ranks = [json.load(open(os.path.join(out, f"{world}.{r}.json")))
                     for r in range(world)]
            rows.append({"ranks": world,
                         "layers per rank": "/".join(str(r["layers"]) for r in ranks),
                         "curvature held, MB (max rank)": f"{max(r['held'] for r in ranks) / 1e6:.0f}",
                         "peak RSS rise, MB (max rank)": f"{max(r['peak'] for r in ranks) / 1e6:.0f}",
                         "peak RSS rise, MB (each rank)": "/".join(f"{r['peak'] / 1e6:.0f}"
                                                                   for r in ranks)})
    text = (f"{args.layers} layers, k_l = {args.k}, {args.rows} rows (store "
            f"{args.rows * args.layers * args.k * 4 / 1e6:.0f} MB), gloo on one CPU machine:\n\n"
            + format_table(rows, list(rows[0])) + "\n")
    report(text, args.out)


if __name__ == "__main__":
    main()
