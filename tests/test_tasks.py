"""grass.tasks losses against per-example autograd on real transformers architectures.

Every padded, mixed-length batch is checked row by row against the same example run alone,
unpadded, through transformers' own loss: the per-example loss and its gradient with respect to
every parameter must agree.
"""

import pytest
import torch

from grass.tasks import IGNORE, CausalLM, PromptCompletion, SequenceClassification
from tiny_models import bert_classifier, causal_lm, padded

ARCHS = ["gpt2", "llama", "qwen2", "gpt_neox"]
BATCHES = {1: [7], 3: [5, 9, 3]}


def _grads(loss, model):
    return torch.autograd.grad(loss, list(model.parameters()), allow_unused=True, retain_graph=True)


def _assert_same_grads(got, want):
    for g, w in zip(got, want):
        if w is None:
            assert g is None or float(g.abs().max()) == 0
            continue
        scale = float(w.abs().max()) + 1e-6
        assert float((g - w).abs().max()) <= 2e-4 * scale + 1e-6


def _alone(model, ids, labels, reduction):
    """transformers' loss (mean over the shifted counted tokens) of one unpadded example."""
    loss = model(input_ids=ids[None], labels=labels[None]).loss
    counted = int((labels[1:] != IGNORE).sum())
    return loss * counted if reduction == "sum" else loss


def _rows(batch, labels):
    """Each example's unpadded ids and labels."""
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        yield row, batch["input_ids"][row, :n], labels[row, :n]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", sorted(BATCHES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_causal_lm_matches_per_example_autograd(arch, size, reduction):
    model = causal_lm(arch)
    batch = padded(BATCHES[size], seed=size)
    task = CausalLM(reduction=reduction)
    losses = task(model, batch)
    assert losses.shape == (size,)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
    for row, ids, lab in _rows(batch, labels):
        want = _alone(model, ids, lab, reduction)
        torch.testing.assert_close(losses[row], want, rtol=1e-5, atol=1e-5)
        _assert_same_grads(_grads(losses[row], model), _grads(want, model))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_labels_with_ignored_positions(arch):
    model = causal_lm(arch)
    batch = padded([6, 8], seed=4)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
    labels[:, :3] = IGNORE  # a prompt that does not count
    losses = CausalLM()(model, {**batch, "labels": labels})
    for row, ids, lab in _rows(batch, labels):
        want = _alone(model, ids, lab, "mean")
        torch.testing.assert_close(losses[row], want, rtol=1e-5, atol=1e-5)
        _assert_same_grads(_grads(losses[row], model), _grads(want, model))


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_completion_counts_only_the_completion(arch):
    model = causal_lm(arch)
    batch = padded([6, 9, 4], seed=5)
    completion = torch.zeros_like(batch["input_ids"])
    for row, start in enumerate([2, 5, 1]):
        completion[row, start:] = 1
    batch["completion_mask"] = completion
    losses = PromptCompletion()(model, batch)
    labels = batch["input_ids"].masked_fill((completion * batch["attention_mask"]) == 0, IGNORE)
    for row, ids, lab in _rows(batch, labels):
        want = _alone(model, ids, lab, "mean")
        torch.testing.assert_close(losses[row], want, rtol=1e-5, atol=1e-5)
        _assert_same_grads(_grads(losses[row], model), _grads(want, model))
    # The prompt conditions: changing a prompt token changes the completion's loss.
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][1, 0] = (changed["input_ids"][1, 0] % 60) + 1
    assert float((PromptCompletion()(model, changed)[1] - losses[1]).detach().abs()) > 1e-6


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", sorted(BATCHES))
def test_causal_lm_fisher_loss_at_sampled_targets(arch, size):
    model = causal_lm(arch)
    batch = padded(BATCHES[size], seed=size + 10)
    task = CausalLM()
    sampled = task.sample_labels(model, batch, torch.Generator().manual_seed(3))
    again = task.sample_labels(model, batch, torch.Generator().manual_seed(3))
    other = task.sample_labels(model, batch, torch.Generator().manual_seed(4))
    assert torch.equal(sampled, again)
    assert not torch.equal(sampled, other)
    observed = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
    # Same positions as the observed loss: t = 0 and padding are never targets.
    assert torch.equal(sampled[:, 1:] == IGNORE, observed[:, 1:] == IGNORE)
    assert bool((sampled[:, 0] == IGNORE).all())
    losses = task.fisher_loss_fn(model, batch, torch.Generator().manual_seed(3))
    for row, ids, lab in _rows(batch, sampled):
        want = _alone(model, ids, lab, "mean")
        torch.testing.assert_close(losses[row], want, rtol=1e-5, atol=1e-5)
        _assert_same_grads(_grads(losses[row], model), _grads(want, model))


@pytest.mark.parametrize("size", [1, 4])
def test_sequence_classification(size):
    model = bert_classifier()
    batch = padded([5, 9, 3, 7][:size] if size > 1 else [6], seed=7)
    batch["labels"] = torch.arange(size) % 3
    task = SequenceClassification()
    losses = task(model, batch)
    gen_labels = task.sample_labels(model, batch, torch.Generator().manual_seed(1))
    fisher = task.fisher_loss_fn(model, batch, torch.Generator().manual_seed(1))
    for row in range(size):
        n = int(batch["attention_mask"][row].sum())
        ids = batch["input_ids"][row, :n][None]
        for got, label in ((losses[row], batch["labels"][row]), (fisher[row], gen_labels[row])):
            want = model(input_ids=ids, labels=label[None]).loss
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            _assert_same_grads(_grads(got, model), _grads(want, model))


def test_bad_inputs_are_named():
    model = causal_lm("gpt2")
    with pytest.raises(ValueError, match="reduction"):
        CausalLM(reduction="none")
    with pytest.raises(TypeError, match="dicts of tensors"):
        CausalLM()(model, (torch.zeros(1, 3, dtype=torch.long),))
    with pytest.raises(ValueError, match="completion_mask"):
        PromptCompletion()(model, padded([4]))
    with pytest.raises(ValueError, match="labels"):
        CausalLM()(model, {**padded([4]), "labels": torch.zeros(1, 2, dtype=torch.long)})
    with pytest.raises(TypeError, match="generator"):
        CausalLM().fisher_loss_fn(model, padded([4]), 0)
