"""The embedded benchmark: scikit-learn's digits (8×8 images, ships with sklearn, no download),
a small MLP classifier, its deterministic trainer, and TRAK-style checkpoint ensembles."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..scoring import one_torch_thread

__all__ = ["DigitsTask", "load_digits", "make_mlp", "margins", "per_example_loss",
           "sampled_label_loss"]


def make_mlp(d_in: int = 64, hidden: int = 32, n_classes: int = 10, *, seed: int = 0) -> nn.Sequential:
    """A one-hidden-layer MLP (d_in -> hidden -> n_classes) with its init fixed by `seed`."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, n_classes))
    finally:
        torch.random.set_rng_state(gen_state)  # leave the caller's RNG stream untouched


def per_example_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """loss_fn for grass.Attributor: cross-entropy of each example, (B,)."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def sampled_label_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                       generator: torch.Generator) -> torch.Tensor:
    """fisher_loss_fn for grass.Attributor(hessian="fisher"): cross-entropy of each example at a
    label drawn from the model's own softmax with ``generator``, (B,). The observed labels are
    not used."""
    x, _ = batch
    logits = model(x)
    drawn = torch.multinomial(logits.detach().softmax(1), 1, generator=generator).squeeze(1)
    return F.cross_entropy(logits, drawn, reduction="none")


@torch.no_grad()
def margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """TRAK's model output f = logit_y - logsumexp(other logits), (B,): the LDS target, more
    linear in the training data than the loss and rising when the loss falls."""
    logits = model(x)
    correct = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return correct - others.logsumexp(dim=1)


@dataclass
class DigitsTask:
    """Standardised digits split into train / test, and the recipe that trains a model on it.

    x_train: (n_train, 64) fp32, y_train: (n_train,) int64; likewise x_test, y_test.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    hidden: int = 32
    epochs: int = 300
    lr: float = 0.02
    weight_decay: float = 1e-3

    @property
    def n_train(self) -> int:
        return self.x_train.shape[0]

    def train(self, subset: torch.Tensor | None = None, *, seed: int = 0) -> nn.Sequential:
        """Train a fresh MLP (init from `seed`) on the rows where `subset` (n_train,) bool is
        True, or on all rows."""
        rows = torch.ones(1, self.n_train, dtype=torch.bool) if subset is None else subset[None]
        return self.train_many(rows, [seed])[0]

    def train_many(self, subsets: torch.Tensor, seeds: list[int]) -> list[nn.Sequential]:
        """Train len(seeds) MLPs at once, model s on the rows where subsets[s] (n_train,) is True
        with its init from seeds[s]. Full-batch Adam, deterministic for given (subsets, seeds).

        Why batched: the models are tiny, so one step of one model is all Python overhead; the
        stacked weights (S, ...) go through bmm, and since Adam is elementwise and model s's
        loss depends only on its own weights, this is S independent trainings in one."""
        if subsets.dim() != 2 or subsets.shape != (len(seeds), self.n_train) or subsets.dtype != torch.bool:
            raise ValueError(f"subsets must be bool (len(seeds)={len(seeds)}, n_train={self.n_train}), "
                             f"got {subsets.dtype} {tuple(subsets.shape)}")
        inits = [make_mlp(self.x_train.shape[1], self.hidden, 10, seed=s) for s in seeds]
        # (S, d_out, d_in) weights and (S, 1, d_out) biases per layer, trained as leaves.
        params = [torch.stack([m[i].weight.detach() for m in inits]).requires_grad_()
                  for i in (0, 2)] + [torch.stack([m[i].bias.detach()[None] for m in inits])
                                      .requires_grad_() for i in (0, 2)]
        w1, w2, b1, b2 = params
        weights = subsets.float() / subsets.sum(1, keepdim=True).float()  # mean over each subset
        x = self.x_train.expand(len(seeds), -1, -1)
        labels = self.y_train.expand(len(seeds), -1)
        opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        # The ops are small: with several threads each one pays a barrier, which costs more
        # than the arithmetic.
        with one_torch_thread():
            for _ in range(self.epochs):
                opt.zero_grad(set_to_none=True)
                hidden = torch.tanh(torch.baddbmm(b1, x, w1.transpose(1, 2)))
                logits = torch.baddbmm(b2, hidden, w2.transpose(1, 2))
                ce = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # (S, n)
                (ce * weights).sum().backward()
                opt.step()
        with torch.no_grad():
            for s, model in enumerate(inits):
                model[0].weight.copy_(w1[s]), model[0].bias.copy_(b1[s, 0])
                model[2].weight.copy_(w2[s]), model[2].bias.copy_(b2[s, 0])
        return [m.eval() for m in inits]

    def ensemble(self, n_models: int, *, seed: int = 0) -> list[nn.Sequential]:
        """n_models checkpoints trained independently on all rows (TRAK averages their scores)."""
        everything = torch.ones(n_models, self.n_train, dtype=torch.bool)
        return self.train_many(everything, [seed + i for i in range(n_models)])

    def test_margins(self, model: nn.Module) -> torch.Tensor:
        """(n_test,) margins of `model` on the test set."""
        return margins(model, self.x_test, self.y_test)

    def accuracy(self, model: nn.Module) -> float:
        with torch.no_grad():
            return float((model(self.x_test).argmax(1) == self.y_test).float().mean())


def load_digits(n_train: int = 1000, n_test: int = 100, *, seed: int = 0, **train_options) -> DigitsTask:
    """Digits split at random (fixed by `seed`) into n_train + n_test examples, standardised
    with the training statistics. `train_options` override DigitsTask's training recipe."""
    from sklearn.datasets import load_digits as _sk_load  # an optional (demo) dependency

    data = _sk_load()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    if n_train <= 0 or n_test <= 0 or n_train + n_test > x.shape[0]:
        raise ValueError(f"need n_train > 0, n_test > 0 and n_train + n_test <= {x.shape[0]}, "
                         f"got n_train={n_train}, n_test={n_test}")
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    train, test = order[:n_train], order[n_train:n_train + n_test]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-3)  # some border pixels are constant
    x = (x - mean) / std
    return DigitsTask(x[train], y[train], x[test], y[test], **train_options)
