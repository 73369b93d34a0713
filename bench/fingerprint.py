"""``grass.Attributor(...)`` construction time at a ~1B-parameter model: the device-side
checksum fingerprint against the host hash of the whole state_dict (``--old-ref``'s
``_model_fingerprint``, read with ``git show``), side by side in interleaved rounds.

The model is ``--layers`` bias-free nn.Linear(d, d) in ``--dtype`` (16 x 8192^2 = 1.07e9
parameters by default). Both sides build the same Attributor (FactGraSS, k = 64); only the
fingerprint function differs. Also printed: the two fingerprint functions alone.

    python -m bench.fingerprint [--layers 16] [--width 8192] [--dtype bfloat16] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import subprocess
from unittest import mock

import torch
from torch import nn

import grass
from bench.timing import ensure_malloc_env, format_table, interleaved_ms, report
from grass import attributor
from grass.fingerprint import model_fingerprint

# The commit whose Attributor hashed the whole state_dict on the host: the baseline.
OLD_REF = "89a5d27f48ac46322cf6c08295eb02ce99277cba"


def old_fingerprint(ref: str):
    """``_model_fingerprint`` of grass/attributor.py at commit ``ref``."""
    source = subprocess.run(["git", "show", f"{ref}:python/grass/attributor.py"], check=True,
                            capture_output=True, text=True).stdout
    node = next(n for n in ast.parse(source).body
                if isinstance(n, ast.FunctionDef) and n.name == "_model_fingerprint")
    namespace = {"hashlib": hashlib, "torch": torch, "nn": nn}
    exec(compile(ast.Module([node], []), f"{ref}:attributor.py", "exec"), namespace)
    return namespace["_model_fingerprint"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--old-ref", default=OLD_REF)
    parser.add_argument("--out")
    args = parser.parse_args()
    ensure_malloc_env()
    old = old_fingerprint(args.old_ref)
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(args.width, args.width, bias=False)
                            for _ in range(args.layers))).to(getattr(torch, args.dtype))
    n_params = sum(p.numel() for p in model.parameters())

    def build():
        return grass.Attributor(model, lambda m, b: m(b).sum(1), grass.FactGraSS(k=64),
                                progress=False)

    def build_old():
        with mock.patch.object(attributor, "model_fingerprint", old):
            return build()

    sides = {"Attributor, host hash": build_old, "Attributor, device checksums": build,
             "host hash alone": lambda: old(model),
             "device checksums alone": lambda: model_fingerprint(model)}
    ms = interleaved_ms(sides, args.rounds, round_s=0)
    baseline = {"Attributor, host hash": "Attributor, host hash",
                "Attributor, device checksums": "Attributor, host hash",
                "host hash alone": "host hash alone", "device checksums alone": "host hash alone"}
    rows = [{"": side, "ms (median)": f"{t:.0f}",
             "host hash / this": f"{ms[baseline[side]] / t:.1f}x"} for side, t in ms.items()]
    table = format_table(rows, ["", "ms (median)", "host hash / this"])
    text = (f"{n_params / 1e9:.2f}e9 parameters ({args.layers} x Linear({args.width}, "
            f"{args.width}), {args.dtype}, CPU, torch threads {torch.get_num_threads()}), "
            f"{args.rounds} interleaved rounds:\n\n{table}\n")
    report(text, args.out)


if __name__ == "__main__":
    main()
