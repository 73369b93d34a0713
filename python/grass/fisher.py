"""The sampled ("true") Fisher: per-layer sums of compressed gradients at targets drawn from the
model's own predictive distribution.

For every train example i and draw s = 1..S, ``fisher_loss_fn(model, batch, generator)`` returns
the loss at targets drawn with ``generator`` from the model's predictions; the compressed
gradients psi_{i,s} of those losses give F_l = 1/(n S) sum_{i,s} psi_{i,s,l} psi_{i,s,l}^T.
This module sums them; the caller divides by n S after summing over ranks.

Exact expectation: for a classifier with few classes, ``ExactClasses(log_probs_fn, C)`` in place
of a sampling fisher_loss_fn makes the C "draws" the C classes, each weighted by its probability,
so the sum is sum_i sum_c p_ic g_ic g_ic^T with no sampling noise, at C capture passes.

Reproducible: draw s of the batch whose first row is r uses a generator seeded from
(seed, s, r), so the targets depend on neither the world size nor a resume. Work is split by
batch: a rank takes the batches whose first row lies in its share of rows.

Resumable (with an on-disk store): every ``checkpoint_rows`` rows the running sums, the first
rows of the finished batches and the run's key (seed, draws, exact or sampled, batch size, world
size, rank) are
saved as one fp64 array of the store, ``fisher_sums.<writer>`` (2 sum_l k_l^2 x 4 bytes). A rerun with the same key continues from there (a finished
pass is read back whole); any other key, or a checkpoint that fails its checksum, starts the pass
over (sums from another split of the batches cannot be told apart per batch). The key cannot see
the loss function itself: a different ``fisher_loss_fn`` needs another store.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

from .curvature import add_outer_products, zero_sums
from .layers import Layout
from .store import GradientStore, StoreError

__all__ = ["ExactClasses", "FisherLoss", "draw_generator", "draws", "sampled_sums"]

# fisher_loss_fn(model, batch, generator) -> (B,) losses at targets drawn with generator.
FisherLoss = Callable[[torch.nn.Module, object, torch.Generator], torch.Tensor]
# features(first_row, batch, loss_fn) -> (B, width) compressed gradients of loss_fn(model, batch).
Features = Callable[[int, object, Callable[[torch.nn.Module, object], torch.Tensor]], torch.Tensor]


class ExactClasses:
    """The exact Fisher of a classifier over its ``n_classes`` classes, instead of sampling.

    log_probs_fn(model, batch) -> (B, n_classes) log-probabilities of the model's predictive
    distribution (e.g. ``model(x).log_softmax(1)``). Draw c is class c with loss
    -sqrt(C p_c) log p_c (the weight detached), so that the mean over the C draws of psi psi^T is
    sum_c p_c g_c g_c^T, the expectation over the model's own labels.
    """

    def __init__(self, log_probs_fn: Callable[[torch.nn.Module, object], torch.Tensor],
                 n_classes: int):
        if not callable(log_probs_fn):
            raise TypeError("log_probs_fn must be callable as log_probs_fn(model, batch) -> (B, C)")
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
            raise ValueError(f"n_classes must be an int >= 2; got {n_classes!r}")
        self.log_probs_fn, self.n_classes = log_probs_fn, n_classes

    def class_loss(self, model: torch.nn.Module, batch, label: int) -> torch.Tensor:
        """(B,) weighted losses of every example at class ``label``."""
        log_probs = self.log_probs_fn(model, batch)
        if log_probs.dim() != 2 or log_probs.shape[1] != self.n_classes:
            raise ValueError(f"log_probs_fn must return (B, n_classes={self.n_classes}) "
                             f"log-probabilities; got {tuple(log_probs.shape)}")
        column = log_probs[:, label]
        return -column * (self.n_classes * column.detach().exp()).sqrt()

    def __call__(self, model, batch, generator):
        raise TypeError("ExactClasses is not a sampling loss: pass it as fisher_loss_fn to "
                        "grass.Attributor, which runs one capture pass per class")


def draws(fisher_loss_fn, samples: int) -> int:
    """Capture passes per batch: the classes for ExactClasses, else ``samples``."""
    return fisher_loss_fn.n_classes if isinstance(fisher_loss_fn, ExactClasses) else samples


def draw_generator(seed: int, draw: int, first_row: int, device: torch.device) -> torch.Generator:
    """The generator of draw ``draw`` for the batch starting at row ``first_row``."""
    digest = hashlib.blake2b(f"{seed}:{draw}:{first_row}".encode(), digest_size=8).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest, "little") >> 1)  # a non-negative int64
    return generator


class _Checkpoint:
    """One rank's running sums, saved in the store as a single fp64 array:
    [key, number of finished batches m, their first rows (m), the sums (sum k_l^2)]."""

    def __init__(self, store: GradientStore, layout: Layout, key: tuple[int, ...]):
        self.store, self.layout, self.key = store, layout, key
        self.name = f"fisher_sums.{store.writer}"

    def load(self, device) -> tuple[dict[str, torch.Tensor], set[int]] | None:
        """(sums, finished first rows) saved by a run with the same key, else None."""
        if not self.store.has_array(self.name):
            return None
        try:
            flat = self.store.load_array(self.name)
        except StoreError as error:
            warnings.warn(f"grass: {error}; the sampled Fisher pass starts over", RuntimeWarning,
                          stacklevel=4)
            return None
        n_key = len(self.key)
        if tuple(int(v) for v in flat[:n_key]) != self.key:
            return None
        m = int(flat[n_key])
        done = {int(v) for v in flat[n_key + 1:n_key + 1 + m]}
        sums, pos = {}, n_key + 1 + m
        for c in self.layout.values():
            sums[c.name] = flat[pos:pos + c.k * c.k].view(c.k, c.k).float().to(device)
            pos += c.k * c.k
        return sums, done

    def save(self, sums: Mapping[str, torch.Tensor], done: set[int]) -> None:
        head = torch.tensor([*self.key, len(done), *sorted(done)], dtype=torch.float64)
        body = [sums[name].detach().double().cpu().reshape(-1) for name in self.layout]
        self.store.save_array(self.name, torch.cat([head, *body]))


def sampled_sums(
    batches: Iterable[tuple[int, object]],
    features: Features,
    fisher_loss_fn: FisherLoss,
    *,
    store: GradientStore,
    samples: int,
    seed: int,
    key: tuple[int, ...],
    device: torch.device,
    checkpoint_rows: int,
    on_batch: Callable[[int], None] | None = None,
    in_step: Callable[[Iterator], Iterator] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-layer sum over this rank's ``batches`` and their draws (``draws(fisher_loss_fn,
    samples)``) of psi psi^T:
    name -> (k_l, k_l) fp32 on ``device``, unnormalised (sums over ranks add up).

    batches: (first row, batch) pairs, this rank's only; those finished by an earlier run with
    the same ``key`` (anything that changes the batches or their split) are skipped.
    on_batch(rows) is called after each batch (progress).
    in_step: for a sharded model, turns the pending (first row, batch) pairs into
        ((first row, batch), real) steps, the same number on every rank (``distributed.lockstep``);
        the draws of a step that is not real run and are discarded.
    """
    # An in-memory store dies with its process: nothing to resume from, so no checkpoints.
    checkpoint = _Checkpoint(store, store.layout, key) if store.path is not None else None
    resumed = checkpoint.load(device) if checkpoint is not None else None
    sums, done = (resumed if resumed is not None
                  else (zero_sums(store.layout.values(), device), set()))
    unsaved = 0
    pending = ((first_row, batch) for first_row, batch in batches if first_row not in done)
    steps = in_step(pending) if in_step is not None else ((item, True) for item in pending)
    for (first_row, batch), real in steps:
        rows = 0
        for draw in range(draws(fisher_loss_fn, samples)):
            if isinstance(fisher_loss_fn, ExactClasses):
                def loss_at_drawn_targets(model, batch, label=draw):
                    return fisher_loss_fn.class_loss(model, batch, label)
            else:
                def loss_at_drawn_targets(model, batch, draw=draw):
                    generator = draw_generator(seed, draw, first_row, device)
                    return fisher_loss_fn(model, batch, generator)

            out = features(first_row, batch, loss_at_drawn_targets)
            if real:
                add_outer_products(sums, out, store.layout.values())
            rows = out.shape[0]
        if not real:
            continue
        done.add(first_row)
        unsaved += rows
        if checkpoint is not None and unsaved >= checkpoint_rows:
            checkpoint.save(sums, done)
            unsaved = 0
        if on_batch is not None:
            on_batch(rows)
    if checkpoint is not None and unsaved:
        checkpoint.save(sums, done)
    return sums
