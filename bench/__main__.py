"""`python -m bench [--quick] [--only flat|factorized] [--threads N] [--out FILE.md]`: the tables.

Re-executes itself first with the malloc thresholds of ``bench.timing.MALLOC_ENV`` so that every
side of every comparison runs under the same allocator settings, then prints one table per
benchmark module (ms, ratios measured side by side in this one process).
"""

from __future__ import annotations

import argparse
import importlib

from .timing import MALLOC_ENV, ensure_malloc_env, format_table

# Module -> the table functions it contributes, in print order.
TABLES = {"flat": ("table",), "factorized": ("table", "path_table")}


def _header() -> str:
    import torch

    malloc = " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {malloc}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--only", choices=sorted(TABLES), help="run one benchmark module")
    parser.add_argument("--out", metavar="FILE.md", help="also write the tables to this file")
    parser.add_argument(
        "--threads", type=int, metavar="N", help="torch threads for every side (default: torch's)"
    )
    args = parser.parse_args()
    ensure_malloc_env()
    if args.threads is not None:
        import torch

        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    sections = [_header()]
    print(sections[0], flush=True)
    for name in [args.only] if args.only else list(TABLES):
        module = importlib.import_module(f".{name}", __package__)
        for fn in TABLES[name]:
            rows = getattr(module, fn)(quick=args.quick)
            text = f"\n## {name}.{fn}\n\n" + format_table(rows, list(rows[0]))
            print(text, flush=True)
            sections.append(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(sections) + "\n")


if __name__ == "__main__":
    main()
