"""Per-example losses for the common tasks, ready to pass as ``loss_fn`` to ``grass.Attributor``.

    loss_fn = grass.tasks.CausalLM(reduction="mean")
    attr = grass.Attributor(model, loss_fn, ...)
    losses = loss_fn(model, batch)                                  # (B,) observed targets
    sampled = loss_fn.fisher_loss_fn(model, batch, generator)       # (B,) sampled targets

Batches are dicts of tensors as a Hugging Face tokenizer returns them, padded on the right:
``input_ids`` (B, T) int64, ``attention_mask`` (B, T) with 1 on real tokens, and per task:

* ``CausalLM``: next-token loss. Targets from ``labels`` (B, T) when present (-100 ignored,
  shifted as transformers does: the logits at t predict labels[t + 1]), else from ``input_ids``
  at the positions where ``attention_mask`` is 1.
* ``PromptCompletion``: a CausalLM whose targets are only the tokens where ``completion_mask``
  (B, T) is 1 (and the attention mask is 1): the prompt conditions but does not count.
* ``SequenceClassification``: cross-entropy of the model's (B, C) logits against ``labels`` (B,).

``reduction`` is "mean" (per example, over its counted tokens) or "sum". Every task's
``fisher_loss_fn(model, batch, generator)`` gives the same per-example losses at targets sampled
from the model's own predictive distribution (same positions and masks) with the torch.Generator:
the gradients whose outer products make the true Fisher rather than the empirical one. Logits are
upcast to fp32 before the softmax whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["IGNORE", "CausalLM", "PromptCompletion", "SequenceClassification"]

IGNORE = -100  # transformers' ignore_index: a label position that does not count
REDUCTIONS = ("mean", "sum")
# Batch keys passed to the model; the others (labels, completion_mask) are read by the task.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def _check_batch(batch, keys: tuple[str, ...], task: str) -> None:
    if not isinstance(batch, Mapping):
        raise TypeError(f"{task} needs batches that are dicts of tensors (as a tokenizer returns "
                        f"them); got {type(batch).__name__}")
    for key in keys:
        if not isinstance(batch.get(key), torch.Tensor):
            raise ValueError(f"{task} needs a tensor batch[{key!r}]; the batch has keys "
                             f"{sorted(batch)}")


def _logits(model: nn.Module, batch: Mapping) -> torch.Tensor:
    inputs = {k: batch[k] for k in MODEL_INPUTS if isinstance(batch.get(k), torch.Tensor)}
    return model(**inputs).logits.float()


def _sample(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One class per row of logits (N, C) drawn from softmax(logits) with ``generator``: (N,)."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")
    probs = logits.detach().softmax(-1).to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)


class CausalLM:
    """Next-token cross-entropy per example; see the module docstring for the batch keys.

    reduction: "mean" over each example's counted tokens (an example with none gives 0) or "sum".
    """

    name = "CausalLM"

    def __init__(self, reduction: str = "mean"):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
        self.reduction = reduction

    def labels(self, batch: Mapping) -> torch.Tensor:
        """The targets (B, T) int64, IGNORE where a position does not count (unshifted)."""
        _check_batch(batch, ("input_ids",), self.name)
        if isinstance(batch.get("labels"), torch.Tensor):
            labels = batch["labels"]
            if labels.shape != batch["input_ids"].shape:
                raise ValueError(f"batch['labels'] must have the shape of batch['input_ids'] "
                                 f"{tuple(batch['input_ids'].shape)}; got {tuple(labels.shape)}")
            return labels
        mask = batch.get("attention_mask")
        ids = batch["input_ids"]
        return ids if mask is None else ids.masked_fill(mask == 0, IGNORE)

    def _reduce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """logits (B, T, V) fp32 and unshifted labels (B, T) -> per-example losses (B,)."""
        targets = labels[:, 1:]
        token = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE,
                                reduction="none")  # (B, T-1), 0 at ignored positions
        total = token.sum(1)
        if self.reduction == "sum":
            return total
        return total / (targets != IGNORE).sum(1).clamp_min(1)

    def __call__(self, model: nn.Module, batch: Mapping) -> torch.Tensor:
        """Per-example losses at the observed targets: (B,) fp32."""
        labels = self.labels(batch)
        return self._reduce(_logits(model, batch), labels)

    def _sampled_labels(self, logits: torch.Tensor, labels: torch.Tensor,
                        generator: torch.Generator) -> torch.Tensor:
        counted = labels[:, 1:] != IGNORE  # (B, T-1): positions whose prediction counts
        drawn = _sample(logits[:, :-1][counted], generator)
        sampled = torch.full_like(labels, IGNORE)
        sampled[:, 1:][counted] = drawn
        return sampled

    def sample_labels(self, model: nn.Module, batch: Mapping,
                      generator: torch.Generator) -> torch.Tensor:
        """The targets ``fisher_loss_fn`` draws with this generator state: (B, T) int64, IGNORE
        where the observed labels are IGNORE (and at t = 0, which no logit predicts)."""
        with torch.no_grad():
            return self._sampled_labels(_logits(model, batch), self.labels(batch), generator)

    def fisher_loss_fn(self, model: nn.Module, batch: Mapping,
                       generator: torch.Generator) -> torch.Tensor:
        """Per-example losses at targets sampled from the model: (B,) fp32."""
        labels = self.labels(batch)
        logits = _logits(model, batch)
        return self._reduce(logits, self._sampled_labels(logits, labels, generator))


class PromptCompletion(CausalLM):
    """Next-token loss over the completion only: ``completion_mask`` (B, T) marks its tokens."""

    name = "PromptCompletion"

    def labels(self, batch: Mapping) -> torch.Tensor:
        _check_batch(batch, ("input_ids", "completion_mask"), self.name)
        keep = batch["completion_mask"].bool()
        if isinstance(batch.get("attention_mask"), torch.Tensor):
            keep = keep & batch["attention_mask"].bool()
        return batch["input_ids"].masked_fill(~keep, IGNORE)


class SequenceClassification:
    """Cross-entropy of the (B, C) logits against ``labels`` (B,) per example."""

    name = "SequenceClassification"

    def __call__(self, model: nn.Module, batch: Mapping) -> torch.Tensor:
        _check_batch(batch, ("input_ids", "labels"), self.name)
        return F.cross_entropy(_logits(model, batch), batch["labels"], reduction="none")

    def sample_labels(self, model: nn.Module, batch: Mapping,
                      generator: torch.Generator) -> torch.Tensor:
        """The classes ``fisher_loss_fn`` draws with this generator state: (B,) int64."""
        _check_batch(batch, ("input_ids",), self.name)
        with torch.no_grad():
            return _sample(_logits(model, batch), generator)

    def fisher_loss_fn(self, model: nn.Module, batch: Mapping,
                       generator: torch.Generator) -> torch.Tensor:
        """Per-example losses at classes sampled from the model: (B,) fp32."""
        _check_batch(batch, ("input_ids",), self.name)
        logits = _logits(model, batch)
        return F.cross_entropy(logits, _sample(logits, generator), reduction="none")
