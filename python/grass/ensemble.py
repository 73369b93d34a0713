"""grass.Ensemble: attribution averaged over several checkpoints or independently trained models.

    ens = grass.Ensemble([grass.Attributor(m, loss_fn, store=f"index/member{i}")
                          for i, m in enumerate(models)])
    ens.cache(train_data)                  # one store per member
    scores = ens.attribute(test_data)      # (n_test, n_train): the mean of the members' scores

Each member is a full Attributor (its own model, compressor, Hessian, damping and store); the
ensemble only runs them in turn and averages, as TRAK does over checkpoints: one model's
influence estimate is noisy in the directions its training run happened to take, and the
average over runs is a better predictor of retraining.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .attributor import Attributor
from .store import GradientStore

__all__ = ["Ensemble"]


class Ensemble:
    """Scores averaged over ``members`` (Attributors, one per checkpoint or model).

    Members with on-disk stores must use distinct directories. ``attribute``, ``top_k`` and
    ``self_influence`` take the same arguments as an Attributor's; test data is passed to every
    member (each computes its own test features).
    """

    def __init__(self, members: Sequence[Attributor]):
        members = list(members)
        if not members or not all(isinstance(m, Attributor) for m in members):
            raise TypeError("members must be a non-empty sequence of grass.Attributor; got "
                            f"{[type(m).__name__ for m in members] or 'nothing'}")
        paths = [os.path.abspath(m.store_path) for m in members if m.store_path is not None]
        if len(set(paths)) != len(paths):
            raise ValueError(f"members must have distinct stores (one per member); got {paths}")
        self.members = members

    def cache(self, train_data) -> list[GradientStore]:
        """Every member's ``cache(train_data)``: one store per member."""
        stores = [member.cache(train_data) for member in self.members]
        rows = {store.n_rows for store in stores}
        if len(rows) != 1:
            raise ValueError(f"members cached different numbers of train rows: {sorted(rows)}")
        return stores

    def attribute(self, test_data, **options) -> torch.Tensor:
        """Mean over members of ``attribute(test_data, **options)``: (n_test, n_train), or
        (L, n_test, n_train) with ``per_layer`` (members must then share their layers)."""
        total = self.members[0].attribute(test_data, **options)
        for member in self.members[1:]:
            total += member.attribute(test_data, **options)
        return total / len(self.members)

    def top_k(self, test_data, k: int = 10, *, cosine: bool = False):
        """The k highest mean scores per test example: (values, indices), (n_test, k)."""
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"k must be a positive int; got {k!r}")
        scores = self.attribute(test_data, cosine=cosine)
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        return top.values, top.indices

    def self_influence(self, *, per_layer: bool = False) -> torch.Tensor:
        """Mean over members of their self-influence: (n_train,), or (L, n_train)."""
        return torch.stack([m.self_influence(per_layer=per_layer) for m in self.members]).mean(0)
