"""Tiny random-init transformers models and padded token batches for the tests (no downloads)."""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 64
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def causal_lm(arch: str, *, seed: int = 0, vocab: int = VOCAB) -> torch.nn.Module:
    """A 2-layer causal LM of architecture ``arch`` (gpt2, llama, qwen2, gpt_neox), eval mode."""
    if arch == "gpt2":
        config = T.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                              bos_token_id=2, eos_token_id=2)
    elif arch == "llama":
        config = T.LlamaConfig(vocab_size=vocab, num_key_value_heads=2, **SIZES)
    elif arch == "qwen2":
        config = T.Qwen2Config(vocab_size=vocab, num_key_value_heads=2, **SIZES)
    elif arch == "gpt_neox":
        config = T.GPTNeoXConfig(vocab_size=vocab, **SIZES)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return T.AutoModelForCausalLM.from_config(config).eval()


def bert_classifier(*, seed: int = 0, labels: int = 3) -> torch.nn.Module:
    config = T.BertConfig(vocab_size=VOCAB, max_position_embeddings=64, num_labels=labels, **SIZES)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return T.BertForSequenceClassification(config).eval()


def padded(lengths: list[int], *, seed: int = 0, pad: int = 0) -> dict[str, torch.Tensor]:
    """Random token rows of the given lengths, right-padded with ``pad``: input_ids and
    attention_mask (B, max(lengths)) int64."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, VOCAB, (n,), generator=gen)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


WORDS = [f"w{i}" for i in range(150)]


def documents(n: int, *, seed: int = 0) -> list[str]:
    """n short documents of 6-12 words drawn from a fixed vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for i in range(n):
        count = int(torch.randint(6, 13, (1,), generator=gen))
        picks = torch.randint(0, len(WORDS), (count,), generator=gen).tolist()
        docs.append(" ".join(WORDS[p] for p in picks))
    return docs


def save_lm(directory, arch: str, docs: list[str], *, seed: int = 0, with_tokenizer=True):
    """Save a tiny causal LM of ``arch`` and a word-level tokenizer trained on ``docs`` into
    ``directory`` (save_pretrained); returns the directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(docs, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]",
                                                                            "[EOS]"]))
    wrapped = T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]",
                                        unk_token="[UNK]", eos_token="[EOS]")
    model = causal_lm(arch, seed=seed, vocab=len(wrapped))
    model.save_pretrained(directory)
    if with_tokenizer:
        wrapped.save_pretrained(directory)
    return directory
