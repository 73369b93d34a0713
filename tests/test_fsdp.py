"""Capture under FSDP2: real gloo ranks, models wrapped with fully_shard per block and at the root.

The reference is the same transformers model (random init, small config) attributed in this
process without any sharding. Every rank of a 2-rank FSDP2 run must give the same store rows,
scores, top-k and self-influence to fp32 rounding, the same model fingerprint, and leave the
model as it found it: sharded DTensor parameters with the same local values and placements,
the same requires_grad flags, and FSDP's hooks still working (a training step after attribution
gives the same gradients as one before).
"""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="FSDP tests use transformers models")

import grass  # noqa: E402
from grass.tasks import CausalLM  # noqa: E402
from bench.ranks import free_port, gloo_group, launch  # noqa: E402

N_TRAIN, N_TEST, T, VOCAB, BATCH, TOP = 11, 3, 8, 67, 3, 4  # 67: uneven shards of the embedding
MODELS = ("gpt2", "llama")


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(5)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=32, n_layer=2,
                                         n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                         attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=T)
    return transformers.LlamaForCausalLM(config)


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.transformer.h if hasattr(model, "transformer") else model.model.layers)


def _data(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, T, dtype=torch.int64)
    mask[::2, T - 3:] = 0  # padded examples: masked tokens must not count
    return {"input_ids": torch.randint(0, VOCAB, (n, T), generator=g), "attention_mask": mask}


def _attributor(model, store, hessian: str) -> grass.Attributor:
    if hessian == "fisher":
        # Batches of 4 start at rows 0 and 4 on rank 0 and at row 8 on rank 1: the sampled-target
        # pass must keep the ranks' sharded forwards in step.
        return grass.Attributor(model, CausalLM(), grass.FactGraSS(k=16), store=store,
                                hessian="fisher", fisher_loss_fn=CausalLM().fisher_loss_fn,
                                fisher_samples=2, batch_size=4, progress=False)
    return grass.Attributor(model, CausalLM(), grass.FactGraSS(k=16), store=store,
                            batch_size=BATCH, progress=False)


def _results(attr: grass.Attributor) -> dict[str, torch.Tensor]:
    test = _data(N_TEST, 2)
    values, indices = attr.top_k(test, TOP)
    return {"rows": attr.store.read(0, N_TRAIN), "scores": attr.attribute(test),
            "top_values": values, "top_indices": indices,
            "self_influence": attr.self_influence()}


def _grads(model) -> dict[str, torch.Tensor]:
    """One training step's gradients (local shards), then cleared: FSDP's hooks at work."""
    CausalLM()(model, _data(4, 9)).sum().backward()
    out = {n: p.grad.to_local().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def _state(model) -> dict[str, tuple]:
    """Per parameter: (local values, placements, requires_grad, is it sharded now)."""
    from torch.distributed.tensor import DTensor
    return {n: (p.to_local().clone(), tuple(p.placements), p.requires_grad,
                isinstance(p, DTensor)) for n, p in model.named_parameters()}


def _worker(rank: int, world: int, port: int, kind: str, hessian: str, store: str,
            out: str) -> None:
    from torch.distributed.fsdp import fully_shard
    with gloo_group(rank, world, port):
        model = _model(kind)
        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        grads_before = _grads(model)
        before = _state(model)
        attr = _attributor(model, store, hessian)
        attr.cache(_data(N_TRAIN, 1))
        results = _results(attr)
        after = _state(model)
        grads_after = _grads(model)
        unchanged = all(torch.equal(before[n][0], after[n][0]) and before[n][1:] == after[n][1:]
                        for n in before)
        same_grads = all(torch.equal(grads_before[n], grads_after[n]) for n in grads_before)
        torch.save({"results": results, "config": attr.config, "unchanged": unchanged,
                    "sharded": all(s[3] for s in after.values()), "same_grads": same_grads},
                   os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("kind, hessian",
                         [(kind, "efim") for kind in MODELS] + [("llama", "fisher")])
def test_fsdp2_two_ranks_match_unsharded(tmp_path, kind, hessian):
    torch.set_num_threads(1)
    reference = _attributor(_model(kind), tmp_path / "single", hessian)
    reference.cache(_data(N_TRAIN, 1))
    expected = _results(reference)
    out = tmp_path / "out"
    os.makedirs(out)
    launch(_worker, 2, (2, free_port(), kind, hessian, str(tmp_path / "store"), str(out)))
    for rank in range(2):
        got = torch.load(os.path.join(out, f"rank{rank}.pt"))
        assert got["config"] == reference.config  # same fingerprint and class name, unsharded
        assert got["sharded"] and got["unchanged"] and got["same_grads"]
        for name, value in expected.items():
            if name == "top_indices":
                assert torch.equal(got["results"][name], value)
            else:
                torch.testing.assert_close(got["results"][name], value, rtol=1e-4, atol=1e-5,
                                           msg=name)
