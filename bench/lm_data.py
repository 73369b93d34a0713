"""Data, model and training for the language-model benchmark (bench/lm.py).

The text is the Python standard library's own source, which ships with every Python: a fixed
sorted list of ``<stdlib>/*.py`` files, tokenised by bytes (vocabulary 256, no tokenizer to
train or download). Each file is cut into non-overlapping blocks of ``block`` bytes; a seeded
permutation of all blocks gives disjoint train and test sets, so test blocks share files (and
so style and identifiers) with training blocks, which gives attribution something to find.

The model is a randomly initialised GPT-2 (transformers' ``GPT2LMHeadModel``) with dropout
off: captured gradients and retrained subset models must be deterministic functions of
(data, seed).
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 256  # byte-level tokens


@dataclass(frozen=True)
class LMConfig:
    """Every knob that changes the data, the model or the training (the ground-truth cache key)."""

    n_train: int = 1024
    n_test: int = 64
    block: int = 128
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    epochs: int = 3
    batch_size: int = 16
    lr: float = 3e-3
    data_seed: int = 0
    init_seed: int = 0


def stdlib_files() -> list[Path]:
    """The fixed, sorted list of top-level standard-library source files."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def load_blocks(cfg: LMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte blocks for training and testing.

    Returns ``train`` (n_train, block) and ``test`` (n_test, block), int64 token ids in [0, 256),
    disjoint, drawn by a permutation seeded with ``cfg.data_seed``.
    """
    chunks = []
    for path in stdlib_files():
        data = path.read_bytes()
        usable = len(data) - len(data) % cfg.block
        if usable:
            chunks.append(torch.frombuffer(bytearray(data[:usable]), dtype=torch.uint8).view(-1, cfg.block))
    blocks = torch.cat(chunks).long()
    need = cfg.n_train + cfg.n_test
    if need > len(blocks):
        raise ValueError(f"n_train + n_test must be <= {len(blocks)} blocks of {cfg.block} bytes, got {need}")
    perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(cfg.data_seed))[:need]
    return blocks[perm[: cfg.n_train]], blocks[perm[cfg.n_train :]]


def make_model(cfg: LMConfig) -> GPT2LMHeadModel:
    """A fresh GPT-2 with weights drawn from ``cfg.init_seed`` and dropout disabled."""
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=cfg.block, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(cfg.init_seed)
        return GPT2LMHeadModel(config).eval()


def per_example_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy of each sequence: ids (B, T) -> (B,)."""
    logits = model(input_ids=ids).logits[:, :-1]
    tok = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
    return tok.view(ids.shape[0], -1).mean(1)


def sampled_token_loss(model: torch.nn.Module, ids: torch.Tensor, generator: torch.Generator
                       ) -> torch.Tensor:
    """fisher_loss_fn: mean cross-entropy of each sequence at next bytes drawn from the model's
    own predictions with ``generator`` (the observed next bytes are not used): ids (B, T) -> (B,)."""
    logits = model(input_ids=ids).logits[:, :-1]
    probs = logits.detach().softmax(-1).reshape(-1, VOCAB)
    drawn = torch.multinomial(probs, 1, generator=generator).view(ids.shape[0], -1)
    tok = F.cross_entropy(logits.reshape(-1, VOCAB), drawn.reshape(-1), reduction="none")
    return tok.view(ids.shape[0], -1).mean(1)


def train(cfg: LMConfig, data: torch.Tensor, *, order_seed: int = 0) -> GPT2LMHeadModel:
    """Train a fresh model on ``data`` (n, T) for ``cfg.epochs`` epochs of shuffled mini-batches.

    The same recipe trains the full model and every subset model (a subset of half the data
    gets half the steps), which is what LDS's counterfactual assumes.
    """
    model = make_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(order_seed)
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(data), generator=gen).split(cfg.batch_size):
            opt.zero_grad(set_to_none=True)
            per_example_loss(model, data[idx]).mean().backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Per-example loss of ``data`` (n, T) under ``model``: (n,) fp32."""
    return torch.cat([per_example_loss(model, b) for b in data.split(batch_size)])
