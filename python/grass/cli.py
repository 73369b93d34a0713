"""The `grass` command: attribute a language model from local files, and the digits demo.

    grass build --model DIR --data FILE --out INDEX     index the documents of FILE (grass.hf)
    grass query INDEX --data FILE | --text "..." --out HITS.jsonl [--top K] [--aggregate mean]
    grass demo [--out grass_out] [--quick]      LDS and time per method over a sweep of k, a PNG
    grass damping [--out grass_out] [--quick]   LDS against relative damping, and the held-out choice

The last two run the digits study of ``grass.demo.study``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from .attributor import DEFAULT_DAMPING
from .demo.study import damping_study, demo

def build_index(args: argparse.Namespace) -> None:
    from . import distributed, hf

    hf.init_distributed()
    options = {k: getattr(args, k) for k in (
        "text_field", "prompt_field", "completion_field", "max_length", "dtype", "compressor",
        "k", "layers", "hessian", "damping", "store_dtype", "batch_size", "seed")}
    with distributed.leaving_group():
        attr = hf.build(args.model, args.data, args.out, truncate=not args.no_truncate,
                        **options)
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
