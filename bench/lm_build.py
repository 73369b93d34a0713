"""End-to-end index build of a language model: `grass build` against `bergson build`, and against
a plain training pass over the same data.

Runs in the peers venv (bench/peers_setup.sh), never in the test suite:

    bash bench/peers_setup.sh
    PYTHONPATH=$PWD:$PWD/python .venv-peers/bin/python -m bench.lm_build

Model: a Llama-shaped causal LM from a small config (4 layers, hidden 512, 8 heads, MLP 1408,
random init, untied lm_head), saved with save_pretrained beside a word-level tokenizer trained
here on the data (max_position_embeddings 2048: bergson refuses a token batch longer than it);
the data are documents of exactly 256 words (= 256 tokens) drawn from a fixed
1000-word vocabulary, in a jsonl file. Both tools read the same directory and file and capture
the same 28 linear layers of the blocks (lm_head excluded on both sides) at the same k per layer
(bergson: projection_dim p gives p x p = k), 8 documents (2048 tokens) per step, mean loss per
document, fp32.

Sides, each one whole command run in this process (model load, data, tokenisation, capture, the
write to disk; grass also computes and saves the per-layer Fisher, bergson builds no curvature),
timed in interleaved rounds (bench.timing.interleaved_ms, one warm-up run per side first), malloc
thresholds set for all sides:
  * grass build (FactGraSS and LoGra), k per layer;
  * bergson build, projection_dim sqrt(k);
  * a training pass: forward, backward and an AdamW step per batch over the same documents.
Results go to bench/results/lm_build.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .peers import version
from .timing import ensure_malloc_env, format_table, interleaved_ms

SEQ, BATCH, VOCAB_WORDS = 256, 8, 1000
LAYERS = "model.layers.*"  # the 7 linear layers of each block


def make_files(root: Path, n_docs: int) -> tuple[str, str]:
    """A saved Llama-shaped model with its tokenizer, and a jsonl of n_docs documents."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    gen = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(VOCAB_WORDS)]
    docs = [" ".join(words[i] for i in torch.randint(0, VOCAB_WORDS, (SEQ,), generator=gen))
            for _ in range(n_docs)]
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]",
                                        unk_token="[UNK]", eos_token="[EOS]")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, intermediate_size=1408,
                         max_position_embeddings=BATCH * SEQ, tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=2, eos_token_id=2)
    torch.manual_seed(0)
    model_dir = root / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return str(model_dir), str(data)


def grass_side(model_dir: str, data: str, out: Path, compressor: str, k: int):
    from grass import cli

    runs = iter(range(10**6))

    def run():
        target = out / f"grass-{compressor}-{next(runs)}"
        code = cli.main(["build", "--model", model_dir, "--data", data, "--out", str(target),
                         "--compressor", compressor, "--k", str(k), "--layers", LAYERS,
                         "--batch-size", str(BATCH), "--max-length", str(SEQ)])
        if code != 0:
            raise RuntimeError(f"grass build exited with {code}")
        shutil.rmtree(target)
    return run


def bergson_side(model_dir: str, data: str, out: Path, k: int):
    from bergson.__main__ import main as bergson_main

    runs = iter(range(10**6))

    def run():
        target = out / f"bergson-{next(runs)}"
        argv = sys.argv
        sys.argv = ["bergson", "build", str(target), "--model", model_dir, "--dataset", data,
                    "--projection_dim", str(math.isqrt(k)), "--filter_modules", "*lm_head",
                    "--token_batch_size", str(BATCH * SEQ), "--loss_reduction", "mean",
                    "--precision", "fp32"]
        try:
            bergson_main()
        finally:
            sys.argv = argv
        shutil.rmtree(target)
    return run


def training_side(model_dir: str, data: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grass.tasks import CausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).train()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [json.loads(line)["text"] for line in open(data, encoding="utf-8")]
    batches = [tokenizer(texts[i:i + BATCH], return_tensors="pt", padding=True)
               for i in range(0, len(texts), BATCH)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = CausalLM()

    def run():
        for batch in batches:
            opt.zero_grad(set_to_none=True)
            loss_fn(model, dict(batch)).mean().backward()
            opt.step()
    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=32, help="documents of 256 tokens (32)")
    parser.add_argument("--k", type=int, default=4096, help="features per layer (4096)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lm_build.md")
    args = parser.parse_args(argv)
    ensure_malloc_env()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = make_files(root, args.docs)
        sides = {
            "grass build FactGraSS": grass_side(model_dir, data, root, "factgrass", args.k),
            "grass build LoGra": grass_side(model_dir, data, root, "logra", args.k),
            "bergson build": bergson_side(model_dir, data, root, args.k),
            "training pass": training_side(model_dir, data),
        }
        ms = interleaved_ms(sides, args.rounds, round_s=0)
    tokens = args.docs * SEQ
    train = ms["training pass"]
    rows = [{"side": side, "median s": f"{t / 1e3:.2f}", "tokens/s": f"{tokens / (t / 1e3):.0f}",
             "x bergson tokens/s": f"{ms['bergson build'] / t:.2f}x",
             "time / training pass": f"{t / train:.2f}x"} for side, t in ms.items()]
    setup = {"docs": args.docs, "tokens": tokens, "seq": SEQ, "batch": BATCH, "k_per_layer": args.k,
             "layers": "28 (4 blocks x 7 linear)", "threads": args.threads, "rounds": args.rounds,
             "torch": torch.__version__, "bergson": version("bergson")}
    text = ("# End-to-end LM index build (bench/lm_build.py)\n\n"
            f"Setup: `{json.dumps(setup)}`; malloc thresholds set for every side.\n\n"
            + format_table(rows, list(rows[0])) + "\n")
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
