"""grass.Attributor: cache compressed per-example training gradients, then score test examples.

    attr = grass.Attributor(model, loss_fn, compressor=grass.FactGraSS(k=4096))
    attr.cache(train_data)                  # features -> GradientStore, per-layer Fisher
    scores = attr.attribute(test_data)      # (n_test, n_train)

Data (``train_data`` / ``test_data``) may be columns (a tensor, or a tuple/list/dict of
tensors), a map-style torch or Hugging Face Dataset, or batches (a list of batch tuples/dicts, a
generator, an IterableDataset, a DataLoader that does not shuffle): ``grass.batches`` gives the
rule that tells them apart. Rows of the store follow the data's order. ``loss_fn(model, batch)`` returns (B,) per-example
losses. A dict batch's ``"token_mask"`` (else ``"attention_mask"``) marks the real tokens; layers
whose inputs are (B, T, d) with the batch's T ignore the masked tokens.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import warnings
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .batches import Source, overlaps, to_device, token_mask
from .capture import Capture, LayerSpec, track_layers
from . import curvature, distributed, fisher, store_repair
from . import index as approx_index
from .compressors import Compressor, FactGraSS, compressor_from_config
from .curvature import DEFAULT_CHUNK, HESSIANS, Preconditioner
from .fingerprint import model_fingerprint
from .scoring import Scorer, TrainNorms
from .store import GradientStore

# Relative damping lambda in F_l + lambda * tr(F_l) / k_l * I, chosen on the digits LDS
# benchmark (`python -m bench.attributor --damping`; the measurements are in bench/README.md).
DEFAULT_DAMPING = 0.5
# Draws per example of hessian="fisher": see the README's "Choosing the Hessian and damping".
DEFAULT_FISHER_SAMPLES = 16
CONFIG_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Features:
    """Compressed gradients of a data set, tagged with the configuration that produced them.

    values: (n, width) fp32, columns as in the store; config: the Attributor's config.
    """

    values: torch.Tensor
    config: dict


def _model_class(model: nn.Module) -> str:
    """The model's class name; for a model wrapped by FSDP2's fully_shard (whose class is a
    generated subclass "FSDP<name>"), the wrapped class's name, so both share one store."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed support
        return type(model).__name__
    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule)).__name__


def _is_store(path: str | os.PathLike) -> bool:
    return os.path.exists(os.path.join(os.fspath(path), "manifest.json"))


def _check_fisher_loss_fn(fisher_loss_fn) -> None:
    """hessian="fisher" computes its curvature with ``fisher_loss_fn``: refuse a missing one."""
    if not callable(fisher_loss_fn):
        raise ValueError(
            "hessian='fisher' needs fisher_loss_fn=f with f(model, batch, generator) -> (B,) "
            "per-example losses at targets sampled from the model's predictions with "
            f"generator; got fisher_loss_fn={fisher_loss_fn!r} (or use hessian='efim')"
        )


def _drop_damaged_rows(path: str | os.PathLike) -> None:
    """Find the damaged rows of the store at ``path`` and make them missing, with a warning."""
    damage = store_repair.find_damage(path)
    if damage:
        warnings.warn(
            f"grass: the store at {os.fspath(path)} has damaged rows, which are recomputed: "
            + "; ".join(map(str, damage)), RuntimeWarning, stacklevel=3)
        store_repair.drop_damage(path, damage)


def _dampings(damping, absolute_damping) -> tuple[float, float]:
    """(relative, absolute) damping from the arguments: the default relative damping unless
    an absolute one is given; both given and non-zero is refused as ambiguous."""
    for name, value in (("damping", damping), ("absolute_damping", absolute_damping)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not value >= 0 or value == float("inf")):
            raise ValueError(f"{name} must be a float >= 0 (and finite); got {value!r}")
    if absolute_damping is None:
        return float(DEFAULT_DAMPING if damping is None else damping), 0.0
    if damping:
        raise ValueError(
            f"damping={damping!r} (relative) and absolute_damping={absolute_damping!r} were both "
            "given: pass one of them (or damping=0 with absolute_damping)"
        )
    return 0.0, float(absolute_damping)


# -- the attributor ----------------------------------------------------------------------------
class Attributor:
    """Training-data attribution with compressed per-example gradients.

    model: the network; its nn.Linear / transformers Conv1D layers are captured (or those that
        ``layers`` selects by fnmatch name pattern or module type).
    loss_fn: ``loss_fn(model, batch) -> (B,)`` per-example losses.
    compressor: a ``grass`` compressor config, k features per layer (default FactGraSS(4096)).
    hessian: "efim" (block-diagonal empirical Fisher, gradients at the observed labels),
        "fisher" (the same at targets sampled from the model: needs ``fisher_loss_fn``) or
        "identity" (plain inner products).
    damping: relative damping lambda: F_l + lambda * tr(F_l) / k_l * I (default 0.5).
    absolute_damping: lambda_abs in F_l + lambda_abs * I instead, e.g. the training weight
        decay (the L2 term's share of the Hessian); giving both, each non-zero, is refused.
    fisher_loss_fn: for hessian="fisher", ``fisher_loss_fn(model, batch, generator) -> (B,)``
        per-example losses at targets drawn from the model's predictive distribution with
        ``generator`` (a torch.Generator on ``device``); or ``grass.fisher.ExactClasses`` for
        the exact expectation over a classifier's classes (one capture pass per class).
    fisher_samples: draws per example for hessian="fisher" (each costs one capture pass).
    store: None (in memory) or a directory for an on-disk GradientStore; a run that was
        interrupted resumes there, computing only the missing rows.
    batch_size: examples per capture step for data that is not a DataLoader.
    seed: the global seed of the random maps (per layer: a hash of (seed, layer name)).
    device: where capture runs (default: the model's device).
    store_dtype: float32, bfloat16 or float16 rows on disk.

    Scores: ``scores[j, i] = phi_j^T (F + lambda I)^{-1} phi_i``; positive means training on
    example i lowers test example j's loss.

    Once built, ``attr.layers`` holds the captured layers' records (``grass.layers``): name ->
    TrackedLayer (module, shape, compressor map, columns) in column order, with their
    ``attr.layers.layout``, which the store's must equal.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, object], torch.Tensor],
        compressor: Compressor | None = None,
        *,
        layers: LayerSpec = None,
        hessian: str = "efim",
        damping: float | None = None,
        absolute_damping: float | None = None,
        fisher_loss_fn: fisher.FisherLoss | None = None,
        fisher_samples: int = DEFAULT_FISHER_SAMPLES,
        store: str | os.PathLike | None = None,
        batch_size: int = 32,
        seed: int = 0,
        device: torch.device | str | None = None,
        store_dtype: torch.dtype = torch.float32,
        chunk_size: int = DEFAULT_CHUNK,
        progress: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model, batch) -> (B,) losses")
        compressor = FactGraSS(k=4096) if compressor is None else compressor
        if not isinstance(compressor, Compressor):
            raise TypeError(
                f"compressor must be a grass compressor (e.g. grass.FactGraSS(k=4096)); got "
                f"{type(compressor).__name__}"
            )
        if hessian not in HESSIANS:
            raise ValueError(f"hessian must be one of {HESSIANS}; got {hessian!r}")
        damping, absolute_damping = _dampings(damping, absolute_damping)
        if hessian == "fisher" and store is None:
            _check_fisher_loss_fn(fisher_loss_fn)
        if isinstance(fisher_samples, bool) or not isinstance(fisher_samples, int) or fisher_samples < 1:
            raise ValueError(f"fisher_samples must be a positive int; got {fisher_samples!r}")
        for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.model, self.loss_fn, self.compressor = model, loss_fn, compressor
        self.hessian, self.damping, self.absolute_damping = hessian, damping, absolute_damping
        self.fisher_loss_fn, self.fisher_samples = fisher_loss_fn, fisher_samples
        self.store_path, self.store_dtype = store, store_dtype
        self.batch_size, self.chunk_size, self.seed = batch_size, chunk_size, seed
        self.device, self.progress = torch.device(device), progress

        # One record per captured layer (module, shape, map, columns), handed to everything below.
        self.layers = track_layers(model, layers, compressor, seed=seed, device=self.device)
        self.config = {
            "version": CONFIG_VERSION,
            "compressor": compressor.config(),
            "seed": seed,
            "model": _model_class(model),
            "parameters": model_fingerprint(model),
            "layers": self.layers.config(),
        }
        self.store: GradientStore | None = None
        self._fishers: dict[str, torch.Tensor] | None = None  # per-layer Fisher (k_l, k_l)
        self._scorer: Scorer | None = None
        self._index: approx_index.ApproximateIndex | None = None

    # -- features ------------------------------------------------------------------------------
    def _in_step(self, source: Source):
        """For a model sharded with FSDP, a function that turns this rank's (start, batch) pairs
        into ((start, batch), real) steps, as many on every rank as the rank with the most
        batches has (each forward all-gathers with every rank); None for other models."""
        if not distributed.sharded_model(self.model):
            return None
        return lambda items: distributed.lockstep(items, lambda: next(source.batches([(0, 1)])))

    def _compute(self, source: Source, wanted, sink: Callable[[int, torch.Tensor], None],
                 desc: str) -> None:
        """Capture every batch overlapping ``wanted`` (all rows when None) and pass
        (start, features) to ``sink``."""
        total = source.n if wanted is None else sum(b - a for a, b in wanted)
        bar = tqdm(total=total, desc=desc, unit="ex", disable=not self.progress)
        in_step = self._in_step(source)
        steps = (in_step(source.batches(wanted)) if in_step is not None
                 else ((item, True) for item in source.batches(wanted)))
        with bar, Capture(self.model, self.layers) as capture:
            for (start, batch), real in steps:
                batch = to_device(batch, self.device)
                out = capture.features(batch, self.loss_fn, token_mask(batch), first_row=start)
                if not real:
                    continue
                sink(start, out)
                stop = start + out.shape[0]
                bar.update(stop - start if wanted is None else
                           sum(b - a for a, b in overlaps(wanted, start, stop)))

    def features(self, data) -> Features:
        """Compressed gradients of ``data`` (any accepted form): Features (n, width)."""
        parts: list[torch.Tensor] = []
        self._compute(Source(data, self.batch_size, "data"), None,
                      lambda start, out: parts.append(out.cpu().clone()), "grass features")
        return Features(torch.cat(parts), self.config)

    def _row_count(self, source: Source, n_rows: int | None) -> int:
        """The number of train rows: the data's own, else ``n_rows``, else an existing store's."""
        if n_rows is not None and (isinstance(n_rows, bool) or not isinstance(n_rows, int)
                                   or n_rows <= 0):
            raise ValueError(f"n_rows must be a positive int; got {n_rows!r}")
        if source.n is not None:
            if n_rows is not None and n_rows != source.n:
                raise ValueError(f"n_rows={n_rows} but train_data has {source.n} rows")
            return source.n
        if n_rows is not None:
            return n_rows
        if self.store_path is not None and _is_store(self.store_path):
            return GradientStore.load(self.store_path).n_rows
        raise ValueError(
            "train_data is an iterable of unknown length: pass cache(train_data, n_rows=N) so "
            "that the store can be sized (a rerun over an existing store needs no n_rows)")

    def cache(self, train_data, *, n_rows: int | None = None, verify: bool = True) -> GradientStore:
        """Compute the training features into the store (only missing rows) and the curvature.

        n_rows: the number of examples, needed only for an iterable of unknown length (a
            generator) whose store does not exist yet; with an in-memory store the iterable is
            read into a list instead.
        verify: first check every recorded row of an existing store against its checksum (one
            read of rows.bin): damaged rows, and all rows of a writer whose progress record or
            checksums cannot be read, are reported in a warning and recomputed, so that the
            store ends bit-identical to an undamaged one.
        Under torch.distributed (torchrun) each rank computes its shard of the missing rows
        into one shared on-disk store: see ``grass.distributed``.
        """
        if verify and self.store_path is not None and _is_store(self.store_path) and (
                not distributed.active() or torch.distributed.get_rank() == 0):
            _drop_damaged_rows(self.store_path)  # other ranks wait in open_store below
        source = Source(train_data, self.batch_size, "train_data")
        if source.n is None and n_rows is None and self.store_path is None:
            source = Source([batch for _, batch in source.batches()], self.batch_size,
                            "train_data")
        source.n = self._row_count(source, n_rows)
        # grass.distributed: rank 0 creates the store first; each rank fills its shard.
        store = distributed.open_store(
            self.store_path, config=self.config, n_rows=source.n, layers=self.layers.layout,
            dtype=self.store_dtype,
        )
        lease = distributed.lease(store)  # one writing run per store
        try:
            missing = distributed.shard(store.missing())

            def write(start: int, out: torch.Tensor) -> None:
                for a, b in overlaps(missing, start, start + out.shape[0]):
                    store.write(a, out[a - start:b - start])

            if missing:
                self._compute(source, missing, write, "grass cache")
            distributed.barrier()  # every rank's rows are on disk before anyone reads them
            self._attach(store, source)
        finally:
            if lease is not None:
                lease.release()
        return store

    def _attach(self, store: GradientStore, source: Source | None = None) -> None:
        """Score against the complete ``store``: its curvature is read from the store, or
        computed once (from its rows for efim, by a sampled-target pass over ``source`` for
        fisher) and saved there for every later Attributor. The damped factorisation waits for
        the first score (a build that only indexes never needs it)."""
        self._fishers = None
        if self.hessian != "identity":
            curvature.check_efim_sizes(store.layout)
        if self.hessian != "identity" and not curvature.has_fisher(store, self.hessian):
            if self.hessian == "fisher":
                if source is None:
                    raise ValueError(f"the index at {store.path} holds no hessian='fisher' "
                                     "curvature: build it with cache(train_data)")
                _check_fisher_loss_fn(self.fisher_loss_fn)
                self._fishers = self._sampled_fisher(source, store)
            elif any(c.k < store.n_rows for c in store.layout.values()):
                # efim layers with k_l >= n_rows are rebuilt from their rows when scoring
                # starts: a store where every layer is such needs nothing computed now.
                self._fishers = distributed.fisher(store, self.chunk_size, self.device)
            # Each rank saves its own layers; rank 0 marks the save complete after all.
            dampings = (self.damping, self.absolute_damping)
            curvature.save_fisher(store, self.hessian, self._fishers or {}, dampings,
                                  complete=not distributed.active())
            distributed.barrier()
            if distributed.active() and torch.distributed.get_rank() == 0:
                curvature.save_fisher(store, self.hessian, {}, dampings)
            distributed.barrier()
        self.store = store
        self._scorer = None
        self._index = None

    def _sampled_fisher(self, source: Source, store: GradientStore) -> dict[str, torch.Tensor]:
        """hessian="fisher": name -> (k_l, k_l) fp32 mean of psi psi^T over rows and draws, each
        rank summing the batches that start in its row share (see grass.fisher)."""
        first, last = distributed.own_rows(source.n)
        rank, world = distributed.rank_world()
        draws = fisher.draws(self.fisher_loss_fn, self.fisher_samples)
        exact = isinstance(self.fisher_loss_fn, fisher.ExactClasses)
        key = (self.seed, draws, int(exact), self.batch_size, world, rank)
        bar = tqdm(total=(last - first) * draws, desc="grass fisher", unit="ex",
                   disable=not self.progress)
        with bar, Capture(self.model, self.layers) as capture:
            def features(start, batch, loss_fn):
                batch = to_device(batch, self.device)
                return capture.features(batch, loss_fn, token_mask(batch), first_row=start)

            own = ((start, batch) for start, batch in source.batches([(first, last)])
                   if first <= start < last)
            sums = fisher.sampled_sums(
                own, features, self.fisher_loss_fn, store=store, samples=self.fisher_samples,
                seed=self.seed, key=key, device=self.device, checkpoint_rows=self.chunk_size,
                on_batch=lambda rows: bar.update(rows * draws), in_step=self._in_step(source))
        return distributed.mean_over_ranks(sums, source.n * draws, store.layout)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, loss_fn, *,
             compressor: Compressor | None = None, **options) -> "Attributor":
        """Reopen an index that ``cache`` built at ``path``, to score without the training data.

        The compressor, seed, layers and store dtype come from the index; ``compressor`` is
        needed only for trained masks (the index keeps their digest, not their values).
        ``hessian`` defaults to the curvature saved in the index and the damping to the
        (relative or absolute) damping recorded with it; other ``options`` (batch_size, device,
        chunk_size, progress) are as in ``Attributor``. The curvature is read, not recomputed.
        Raises ValueError naming what differs when ``model`` (weights, class, layers) or the
        options do not match the index, and when the index is incomplete.
        """
        if not _is_store(path):
            raise ValueError(f"path {os.fspath(path)!r} holds no grass index (no manifest.json)")
        saved = GradientStore.load(path)
        config = saved.config
        if compressor is None:
            compressor = compressor_from_config(config.get("compressor", {}))
        kinds = [h for h in HESSIANS if curvature.has_fisher(saved, h)]
        options.setdefault("hessian", kinds[0] if kinds else "identity")
        if ("damping" not in options and "absolute_damping" not in options and kinds
                and options["hessian"] == kinds[0]):
            relative, absolute = curvature.saved_damping(saved, kinds[0])
            if absolute:
                options.update(damping=0.0, absolute_damping=absolute)
            else:
                options["damping"] = relative
        layers = [glob.escape(name) for name, *_ in config.get("layers", [])]
        attr = cls(model, loss_fn, compressor, layers=layers or None, seed=config.get("seed", 0),
                   store=path, store_dtype=saved.dtype, **options)
        differ = sorted(k for k in config.keys() | attr.config.keys()
                        if config.get(k) != attr.config.get(k))
        if differ:
            details = "; ".join(f"{k}: index has {config.get(k)!r}, this model/config gives "
                                f"{attr.config.get(k)!r}" for k in differ if k != "parameters")
            if "parameters" in differ:
                details = ("the model's weights differ from those the index was built with"
                           + ("; " + details if details else ""))
            raise ValueError(f"the index at {os.fspath(path)} was built with another model or "
                             f"configuration: {details}")
        if not saved.complete:
            raise ValueError(f"the index at {os.fspath(path)} is incomplete (rows "
                             f"{saved.missing()} missing): rerun its build to finish it")
        # Opened with this Attributor's columns: a store that places them otherwise is refused.
        store = distributed.open_store(path, config=config, n_rows=saved.n_rows,
                                       layers=attr.layers.layout, dtype=saved.dtype)
        attr._attach(store)
        if approx_index.exists(path):
            try:
                attr._index = approx_index.load(path, attr._index_identity())
            except (ValueError, ImportError) as err:
                # Exhaustive scoring still works; top_k(approximate=True) raises this again.
                warnings.warn(f"grass: the approximate index is not used: {err}", RuntimeWarning,
                              stacklevel=2)
        return attr

    # -- scores --------------------------------------------------------------------------------
    def _test_values(self, test_data) -> torch.Tensor:
        """Test features (n_test, width) fp32 on ``self.device``: scoring runs where capture
        does (on a GPU the train chunks are staged there through pinned memory)."""
        return self._test_features(test_data).to(self.device)

    def _test_features(self, test_data) -> torch.Tensor:
        self._scorer_checked()
        if isinstance(test_data, Features):
            if test_data.config != self.config:
                differ = sorted(k for k in self.config if test_data.config.get(k) != self.config[k])
                raise ValueError(
                    "test features were computed with a different configuration than the "
                    f"train store (differs in {differ}): recompute them with this Attributor"
                )
            return test_data.values
        return self.features(test_data).values

    def attribute(self, test_data, *, per_layer: bool = False, cosine: bool = False):
        """Scores (n_test, n_train); (L, n_test, n_train) with ``per_layer`` (layer order of
        ``self.layers``); ``cosine`` normalises by the preconditioned norms."""
        test = self._test_values(test_data)
        return self._scorer_checked().scores(test, per_layer=per_layer, cosine=cosine,
                                   progress=self.progress)

    def top_k(self, test_data, k: int = 10, *, cosine: bool = False, approximate: bool = False,
              candidates: int | None = None):
        """The k most helpful train examples per test example: (values, indices), (n_test, k).

        approximate: the index of ``build_index`` proposes ``candidates * k`` rows per test
        example (default: the multiplier the index was built with) and only those rows are
        read from the store and scored exactly; values are exact scores, but a true top-k row
        the index did not propose is missed. A test example with fewer than k proposed rows
        gets -inf values and index -1 in its last places.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"k must be a positive int; got {k!r}")
        if not approximate:
            return self._scorer_checked().top_k(self._test_values(test_data), k, cosine=cosine)
        if cosine:
            raise ValueError("top_k(approximate=True) scores plain preconditioned inner "
                             "products: use cosine=False, or approximate=False for cosine")
        if candidates is not None and (isinstance(candidates, bool)
                                       or not isinstance(candidates, int) or candidates <= 0):
            raise ValueError(f"candidates must be a positive int (rows proposed per wanted "
                             f"row) or None; got {candidates!r}")
        precondition = self._scorer_checked().precondition
        if self._index is None:
            self._index = approx_index.load(self.store.path, self._index_identity())
        return self._index.top_k(self.store, precondition, self._test_values(test_data).float(),
                                 k, candidates)

    def build_index(self, *, dim: int = approx_index.DEFAULT_DIM, kind: str = "auto", c: int = 1,
                    seed: int = 0, nlist: int | None = None, nprobe: int | None = None,
                    hnsw_m: int = 32, candidates: int | None = None):
        """Build the approximate index for ``top_k(approximate=True)`` into the store directory.

        Rows are whitened per layer by the damped curvature, sketched to ``dim`` columns with
        sjlt (c non-zeros per coordinate, ``seed``) and indexed by FAISS: kind "flat" (exact
        search of the sketches), "sq8" (8-bit codes), "pq" (4-bit product-quantisation codes),
        "ivf" (nlist inverted lists, nprobe searched per query), "hnsw" (hnsw_m links per node)
        or "auto" (flat while n x dim fp32 sketches fit in 64 MiB, pq above). ``candidates``:
        the default rows proposed per wanted row (None: 30 for pq, 10 otherwise). Needs a
        complete on-disk store and ``faiss-cpu``; returns the ApproximateIndex.
        """
        self._scorer_checked()
        if self.store.path is None:
            raise ValueError("build_index needs an on-disk store (Attributor(..., store=DIR)): "
                             "the index is kept in the store's directory")
        approx_index.require_faiss()
        self._index = approx_index.build(
            self.store, self._scorer_checked().precondition, self._index_identity(), dim=dim,
            kind=kind, c=c, seed=seed, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m,
            candidates=candidates, chunk_size=self.chunk_size, progress=self.progress)
        return self._index

    def _index_identity(self) -> dict:
        return approx_index.identity(self.store, self.hessian,
                                     (self.damping, self.absolute_damping))

    def self_influence(self, *, per_layer: bool = False) -> torch.Tensor:
        """phi_i^T (F + lambda I)^{-1} phi_i per train example: (n_train,), or (L, n_train)."""
        return self._scorer_checked().self_influence(per_layer=per_layer)

    def _scorer_checked(self) -> Scorer:
        if self.store is None:
            raise RuntimeError("call cache(train_data) before scoring")
        if self._scorer is None:
            layout = self.store.layout
            if self.hessian != "identity" and self._fishers is None:
                self._fishers = curvature.load_fisher(
                    self.store, self.hessian, self.chunk_size, self.device,
                    names=distributed.own_layers(self.store.layout))
            # Factors are computed and kept on the capture device, beside the test features.
            precondition = (Preconditioner.identity(layout) if self._fishers is None else
                            Preconditioner.efim({name: f.to(self.device) for name, f
                                                 in self._fishers.items()}, layout,
                                                self.damping, self.absolute_damping))
            # cosine and self_influence read the train norms kept with the store under this
            # curvature and damping, or compute them once and keep them there.
            norms = TrainNorms(self.store, self.hessian, (self.damping, self.absolute_damping)
                               if self.hessian != "identity" else (0.0, 0.0))
            self._scorer = distributed.scorer(self.store, precondition, self.chunk_size, norms)
        return self._scorer
