"""Curvature: the block-diagonal empirical Fisher and its damped inverse.

hessian="efim": per layer F_l = (1/n) sum_i phi_{i,l} phi_{i,l}^T, accumulated in fp32 while
streaming over chunks of the store (the rows never have to fit in RAM together), damped
relatively, F_l + lambda * tr(F_l) / k_l * I, and applied through its Cholesky factor.
hessian="identity": no preconditioning (plain inner products, GradDot / TracIn style).
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping

import torch

HESSIANS = ("efim", "identity")
# A dense F_l is k_l x k_l: past this size (1 GB in fp32) efim is refused rather than run.
MAX_EFIM_K = 16384
# Cholesky condition estimate (max/min diagonal of the factor, squared) above which the damped
# matrix is called ill-conditioned: scores then carry only a few correct digits.
ILL_CONDITIONED = 1e8
DEFAULT_CHUNK = 4096


def fisher_sums(store, rows: tuple[int, int], chunk_size: int = DEFAULT_CHUNK,
                device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Per-layer sum_i phi_{i,l} phi_{i,l}^T over store rows [start, stop): name -> (k_l, k_l)
    fp32 on ``device`` (default CPU), unnormalised so that sums over disjoint row ranges add up
    (grass.distributed all-reduces them). 2 k_l^2 flops per row and layer: for hundreds of
    layers at k_l = 4096 a GPU rank does them far faster than its host."""
    check_efim_sizes(store.layers)
    mats = {name: torch.zeros(k, k, device=device) for name, k in store.layers.items()}
    first, last = rows
    for row in range(first, last, chunk_size):
        chunk = store.read(row, min(row + chunk_size, last)).to(device)
        for name, (start, stop) in store.offsets.items():
            block = chunk[:, start:stop].float()
            mats[name].addmm_(block.T, block)
    return mats


def check_efim_sizes(layers: Mapping[str, int]) -> None:
    """Raise ValueError when a layer's k_l x k_l Fisher would pass ``MAX_EFIM_K``."""
    too_big = {name: k for name, k in layers.items() if k > MAX_EFIM_K}
    if too_big:
        raise ValueError(
            f"hessian='efim' needs a k_l x k_l matrix per layer, at most k_l = {MAX_EFIM_K}; "
            f"layers {too_big} are larger: compress them or use hessian='identity'"
        )


class Preconditioner:
    """Applies (F_l + lambda_l I)^{-1} to each layer's columns of a feature matrix.

    ``factors`` is None for hessian="identity"; otherwise name -> Cholesky factor L
    (fp64) of the damped F_l.
    """

    def __init__(
        self,
        offsets: Mapping[str, tuple[int, int]],
        factors: Mapping[str, torch.Tensor] | None,
    ):
        self.offsets = dict(offsets)
        self.factors = None if factors is None else dict(factors)

    @classmethod
    def identity(cls, offsets: Mapping[str, tuple[int, int]]) -> "Preconditioner":
        return cls(offsets, None)

    @classmethod
    def efim(
        cls,
        fishers: Mapping[str, torch.Tensor],
        offsets: Mapping[str, tuple[int, int]],
        damping: float,
    ) -> "Preconditioner":
        factors = {name: damped_cholesky(f, damping, name) for name, f in fishers.items()}
        return cls(offsets, factors)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """(m, width) fp32 -> (m, width) fp32, layer by layer."""
        if self.factors is None:
            return features
        out = torch.empty_like(features, dtype=torch.float32)
        for name, (start, stop) in self.offsets.items():
            factor = self.factors[name]
            block = features[:, start:stop].to(factor.device, torch.float64)
            out[:, start:stop] = torch.cholesky_solve(block.T, factor).T.to(out.device)
        return out


def damped_cholesky(fisher: torch.Tensor, damping: float, name: str = "") -> torch.Tensor:
    """Cholesky factor (fp64) of fisher + damping * tr(fisher) / k * I.

    If the factorisation fails (an indefinite matrix from rounding at tiny damping), the
    damping grows tenfold until it succeeds, with a warning; a warning also flags a factor
    whose condition estimate exceeds ``ILL_CONDITIONED``.
    """
    k = fisher.shape[0]
    mat = fisher.to(torch.float64)
    scale = float(torch.diagonal(mat).sum()) / k
    if not math.isfinite(scale) or scale <= 0:
        # All-zero gradients (an unused layer): any positive damping gives a well-posed solve.
        scale = 1.0
    lam = damping * scale
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
    return factor


# -- kept with the store -----------------------------------------------------------------------
# Arrays of a store, per hessian kind h: "h.<layer>" the Fisher F_l (k_l, k_l) fp32, "h.damping"
# the damping in use when it was computed, and last "h.rows" the row count it covers (its presence
# marks a complete save). A layer with k_l >= n_rows has no array: its n_rows x k_l columns of the
# store are fewer values than F_l, so F_l is rebuilt from them when the store is opened.
def save_fisher(store, hessian: str, fishers: Mapping[str, torch.Tensor], damping: float) -> None:
    """Save per-layer Fishers (name -> (k_l, k_l)) of all ``store.n_rows`` rows with the store."""
    for name, mat in fishers.items():
        if store.layers[name] < store.n_rows:
            store.save_array(f"{hessian}.{name}", mat.float())
    store.save_array(f"{hessian}.damping", torch.tensor(float(damping), dtype=torch.float64))
    store.save_array(f"{hessian}.rows", torch.tensor(store.n_rows, dtype=torch.int64))


def has_fisher(store, hessian: str) -> bool:
    """Whether ``store`` holds the Fisher of all its rows for ``hessian``."""
    return (store.has_array(f"{hessian}.rows")
            and int(store.load_array(f"{hessian}.rows")) == store.n_rows)


def load_fisher(store, hessian: str, chunk_size: int = DEFAULT_CHUNK,
                device: torch.device | str | None = None) -> dict[str, torch.Tensor] | None:
    """The per-layer Fishers (name -> (k_l, k_l) fp32, CPU) saved with ``store`` for
    ``hessian``, layers without an array rebuilt from their columns on ``device``; None when the
    store holds none covering all of its rows."""
    if not has_fisher(store, hessian):
        return None
    out = {}
    for name, k in store.layers.items():
        if k < store.n_rows:
            out[name] = store.load_array(f"{hessian}.{name}")
            continue
        mat = torch.zeros(k, k, device=device)
        for start in range(0, store.n_rows, chunk_size):
            block = store.read(start, min(start + chunk_size, store.n_rows), layer=name)
            block = block.to(device)
            mat.addmm_(block.T, block)
        out[name] = mat.cpu() / store.n_rows
    return out


def saved_damping(store, hessian: str) -> float:
    """The damping recorded with the Fisher saved for ``hessian``."""
    return float(store.load_array(f"{hessian}.damping"))
