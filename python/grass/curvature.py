"""Curvature: the block-diagonal Fisher (empirical or sampled) and its damped inverse.

hessian="efim": per layer F_l = (1/n) sum_i phi_{i,l} phi_{i,l}^T over the stored features
(gradients at the observed labels), accumulated in fp32 while streaming over chunks of the store
(the rows never have to fit in RAM together).
hessian="fisher": the same sum over gradients at targets sampled from the model's own predictive
distribution (grass.fisher computes them); in expectation it is the Gauss-Newton matrix, which
for cross-entropy is the Hessian's positive part.
Either is damped, F_l + (lambda * tr(F_l) / k_l + lambda_abs) * I, and applied through its
Cholesky factor: relative damping lambda scales with the layer's curvature, absolute damping
lambda_abs is the L2 term of the training objective (its weight decay) in the Hessian.
hessian="identity": no preconditioning (plain inner products, GradDot / TracIn style).
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Mapping

import torch

from .layers import LayerColumns, Layout

HESSIANS = ("efim", "fisher", "identity")
# A dense F_l is k_l x k_l: past this size (1 GB in fp32) efim is refused rather than run.
MAX_EFIM_K = 16384
# Cholesky condition estimate (max/min diagonal of the factor, squared) above which the damped
# matrix is called ill-conditioned: scores then carry only a few correct digits.
ILL_CONDITIONED = 1e8
DEFAULT_CHUNK = 4096
# Largest condition-number bound (tr(F) + lam) / lam at which a damped factor is kept in fp32:
# scores through fp32 factors stayed within 1e-5 of fp64 ones up to this bound in the factor
# precision measurement of bench/README.md; at the default relative damping the bound is 2k + 1.
FP32_FACTOR_CONDITION = 1e6


def fisher_sums(store, rows: tuple[int, int], chunk_size: int = DEFAULT_CHUNK,
                device: torch.device | str | None = None,
                names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Per-layer sum_i phi_{i,l} phi_{i,l}^T over store rows [start, stop): name -> (k_l, k_l)
    fp32 on ``device`` (default CPU), unnormalised so that sums over disjoint row ranges add up.
    ``names``: only these layers (a rank's own layers under grass.distributed), default all.
    2 k_l^2 flops per row and layer: for hundreds of layers at k_l = 4096 a GPU rank does them
    far faster than its host."""
    check_efim_sizes(store.layout)
    wanted = _columns_of(store.layout, names)
    mats = zero_sums(wanted, device)
    first, last = rows
    for row in range(first, last, chunk_size):
        add_outer_products(mats, store.read(row, min(row + chunk_size, last)).to(device), wanted)
    return mats


def _columns_of(layout: Layout, names: Iterable[str] | None) -> list[LayerColumns]:
    """The column records of ``names`` (all layers when None), in the order given."""
    return list(layout.values()) if names is None else [layout[name] for name in names]


def zero_sums(layers: Iterable[LayerColumns], device: torch.device | str | None = None
              ) -> dict[str, torch.Tensor]:
    """name -> (k_l, k_l) fp32 zeros: the start of a per-layer sum of outer products."""
    return {c.name: torch.zeros(c.k, c.k, device=device) for c in layers}


def add_outer_products(mats: Mapping[str, torch.Tensor], rows: torch.Tensor,
                       layers: Iterable[LayerColumns]) -> None:
    """mats[l] += rows_l^T rows_l in place for each of ``layers``, rows (m, width) with layer l
    in its columns."""
    for columns in layers:
        block = rows[:, columns.cols].float()
        mats[columns.name].addmm_(block.T, block)


def check_efim_sizes(layout: Layout) -> None:
    """Raise ValueError when a layer's k_l x k_l Fisher would pass ``MAX_EFIM_K``."""
    too_big = {name: k for name, k in layout.sizes.items() if k > MAX_EFIM_K}
    if too_big:
        raise ValueError(
            f"hessian='efim' needs a k_l x k_l matrix per layer, at most k_l = {MAX_EFIM_K}; "
            f"layers {too_big} are larger: compress them or use hessian='identity'"
        )


class Preconditioner:
    """Applies (F_l + lambda_l I)^{-1} to each layer's columns of a feature matrix.

    ``layout`` places the layers' columns; ``factors`` is None for hessian="identity",
    otherwise name -> Cholesky factor L (fp32 or fp64, see ``damped_cholesky``) of the damped
    F_l.
    """

    def __init__(self, layout: Layout, factors: Mapping[str, torch.Tensor] | None):
        self.layout = layout
        self.factors = None if factors is None else dict(factors)

    @classmethod
    def identity(cls, layout: Layout) -> "Preconditioner":
        return cls(layout, None)

    @classmethod
    def efim(
        cls,
        fishers: Mapping[str, torch.Tensor],
        layout: Layout,
        damping: float,
        absolute_damping: float = 0.0,
    ) -> "Preconditioner":
        """Factors of every layer's damped Fisher (either kind): see ``damped_cholesky``."""
        factors = {name: damped_cholesky(f, damping, name, absolute_damping)
                   for name, f in fishers.items()}
        return cls(layout, factors)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """(m, width) fp32 -> (m, width) fp32, layer by layer; the columns of a layer without
        a factor (another rank's, under grass.distributed) are zero."""
        if self.factors is None:
            return features
        out = torch.zeros_like(features, dtype=torch.float32)
        for name, factor in self.factors.items():
            cols = self.layout[name].cols
            block = features[:, cols].to(factor.device, factor.dtype)
            out[:, cols] = torch.cholesky_solve(block.T, factor).T.to(out.device)
        return out


def damped_cholesky(fisher: torch.Tensor, damping: float, name: str = "",
                    absolute_damping: float = 0.0) -> torch.Tensor:
    """Cholesky factor of fisher + (damping * tr(fisher) / k + absolute_damping) * I, computed
    in fp64 and kept in fp32 where the damping bounds the condition number by
    ``FP32_FACTOR_CONDITION`` (always at the default relative damping), else in fp64.

    fisher: (k, k) float. If the factorisation fails (an indefinite matrix from rounding at tiny
    damping), the damping grows tenfold until it succeeds, with a warning; a warning also flags
    a factor whose condition estimate exceeds ``ILL_CONDITIONED``.
    """
    k = fisher.shape[0]
    mat = fisher.to(torch.float64)
    scale = float(torch.diagonal(mat).sum()) / k
    if not math.isfinite(scale) or scale <= 0:
        # All-zero gradients (an unused layer): any positive damping gives a well-posed solve.
        scale = 1.0
    lam = damping * scale + absolute_damping
    for _ in range(12):
        factor, info = torch.linalg.cholesky_ex(mat + lam * torch.eye(k, dtype=mat.dtype))
        if int(info) == 0:
            break
        lam = max(lam * 10, 1e-6 * scale)
        warnings.warn(
            f"grass: damped Fisher of layer {name!r} is not positive definite; raising the "
            f"damping to {lam / scale:.3g} x tr(F)/k",
            RuntimeWarning,
            stacklevel=3,
        )
    else:
        raise ValueError(f"Fisher of layer {name!r} could not be factorised (non-finite entries?)")
    diag = torch.diagonal(factor)
    condition = float((diag.max() / diag.min()) ** 2)
    if condition > ILL_CONDITIONED:
        warnings.warn(
            f"grass: damped Fisher of layer {name!r} is ill-conditioned (condition estimate "
            f"{condition:.2g}); scores may be inaccurate: increase damping",
            RuntimeWarning,
            stacklevel=3,
        )
    # The eigenvalues of F + lam I lie in [lam, tr(F) + lam]: a bound on the condition number.
    bound = (scale * k + lam) / lam
    return factor.float() if bound <= FP32_FACTOR_CONDITION else factor


# -- kept with the store -----------------------------------------------------------------------
# Arrays of a store, per hessian kind h: "h.<layer>" the Fisher F_l (k_l, k_l) fp32, "h.damping"
# the damping in use when it was computed, and last "h.rows" the row count it covers (its presence
# marks a complete save). A layer with k_l >= n_rows has no array: its n_rows x k_l columns of the
# store are fewer values than F_l, so F_l is rebuilt from them when the store is opened.
def _rebuildable(store, hessian: str, name: str) -> bool:
    """An efim layer with k_l >= n_rows is cheaper to rebuild from its rows than to save: its
    k_l x k_l Fisher is larger than the rows themselves. Other curvatures are not in the rows."""
    return hessian == "efim" and store.layout[name].k >= store.n_rows


def save_fisher(store, hessian: str, fishers: Mapping[str, torch.Tensor],
                dampings: tuple[float, float], complete: bool = True) -> None:
    """Save per-layer Fishers (name -> (k_l, k_l)) of all ``store.n_rows`` rows with the store,
    with the (relative, absolute) damping they were built for. ``complete=False`` saves only
    the layers (each rank its own); the call that marks the save complete comes last."""
    for name, mat in fishers.items():
        if not _rebuildable(store, hessian, name):
            store.save_array(f"{hessian}.{name}", mat.float())
    if not complete:
        return
    store.save_array(f"{hessian}.damping", torch.tensor([float(d) for d in dampings],
                                                        dtype=torch.float64))
    store.save_array(f"{hessian}.rows", torch.tensor(store.n_rows, dtype=torch.int64))


def has_fisher(store, hessian: str) -> bool:
    """Whether ``store`` holds the Fisher of all its rows for ``hessian``."""
    return (store.has_array(f"{hessian}.rows")
            and int(store.load_array(f"{hessian}.rows")) == store.n_rows)


def load_fisher(store, hessian: str, chunk_size: int = DEFAULT_CHUNK,
                device: torch.device | str | None = None,
                names: Iterable[str] | None = None) -> dict[str, torch.Tensor] | None:
    """The per-layer Fishers (name -> (k_l, k_l) fp32, CPU) saved with ``store`` for
    ``hessian`` (only the layers in ``names``, default all), efim layers without an array
    rebuilt from their columns on ``device``; None when the store holds none covering all of
    its rows."""
    if not has_fisher(store, hessian):
        return None
    out = {}
    for columns in _columns_of(store.layout, names):
        name = columns.name
        if not _rebuildable(store, hessian, name):
            out[name] = store.load_array(f"{hessian}.{name}")
            continue
        # The layer's own block of each chunk: its columns start at 0 there.
        block_layout = Layout([(name, columns.k)])
        mats = zero_sums(block_layout.values(), device)
        for start in range(0, store.n_rows, chunk_size):
            block = store.read(start, min(start + chunk_size, store.n_rows), layer=name)
            add_outer_products(mats, block.to(device), block_layout.values())
        out[name] = mats[name].cpu() / store.n_rows
    return out


def saved_damping(store, hessian: str) -> tuple[float, float]:
    """The (relative, absolute) damping recorded with the Fisher saved for ``hessian``."""
    relative, absolute = store.load_array(f"{hessian}.damping").tolist()
    return relative, absolute
