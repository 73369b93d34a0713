"""Argument checks shared by every public op.

Each check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (wrong size or value)
naming the argument and what was expected, before any kernel runs.
"""

from __future__ import annotations

import weakref

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Tables and index tensors are checked once per tensor version; the checks that need the
# values (range, uniqueness) would otherwise sync the GPU on every call.
# Keyed by id() (a WeakKeyDictionary compares tensors with ==, which is elementwise); a
# finalizer drops the entry when the tensor dies, so a reused id never inherits a check.
_checked_indices: dict[int, tuple] = {}


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int; got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int; got {value}")
    return value


def sjlt_sizes(k, c) -> tuple[int, int]:
    """k > 0, 1 <= c <= k and c | k (each of the c blocks holds k / c buckets)."""
    k = positive_int("k", k)
    c = positive_int("c", c)
    if c > k:
        raise ValueError(f"c (buckets per coordinate) must be at most k = {k}; got c = {c}")
    if k % c:
        raise ValueError(f"k must be divisible by c: k = {k}, c = {c} (try k = {k - k % c})")
    return k, c


def floating(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, bfloat16 or float16; got {t.dtype}"
            + (" (cast with .float())" if t.dtype == torch.float64 else "")
        )
    return t


def ndim(name: str, t: torch.Tensor, allowed: tuple[int, ...], shape_doc: str) -> None:
    if t.dim() not in allowed:
        raise ValueError(f"{name} must have shape {shape_doc}; got {tuple(t.shape)}")


def same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(
            f"{name} is on {t.device} but {ref_name} is on {ref.device}; move it with "
            f"{name}.to({ref_name}.device)"
        )


def indices(name: str, idx, d: int, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """A 1-D integer index set into [0, d) without duplicates, on ``ref``'s device: int64."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D integer torch.Tensor; got {type(idx).__name__}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 or int32; got {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{name} must be 1-D (k',); got shape {tuple(idx.shape)}")
    same_device(name, idx, ref_name, ref)
    n = idx.numel()
    if n == 0:
        raise ValueError(f"{name} must not be empty")
    if n > d:
        raise ValueError(f"{name} has {n} entries but the dimension it indexes is only {d}")
    key = (d, idx._version, idx.data_ptr())
    if _checked_indices.get(id(idx)) != key:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= d:
            raise ValueError(f"{name} must lie in [0, {d}); got values in [{lo}, {hi}]")
        if torch.unique(idx).numel() != n:
            raise ValueError(f"{name} has duplicate entries; a mask keeps each coordinate once")
        if id(idx) not in _checked_indices:
            weakref.finalize(idx, _checked_indices.pop, id(idx), None)
        _checked_indices[id(idx)] = key
    return idx.to(torch.int64)


def token_mask(mask, batch: int, tokens: int, ref: torch.Tensor):
    """An optional (B, T) mask, bool or float: returned as float32 or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"token_mask must be a (B, T) torch.Tensor; got {type(mask).__name__}")
    if tuple(mask.shape) != (batch, tokens):
        raise ValueError(
            f"token_mask must have shape (B, T) = ({batch}, {tokens}); got {tuple(mask.shape)}"
        )
    if mask.is_complex():
        raise TypeError(f"token_mask must be bool or real; got {mask.dtype}")
    same_device("token_mask", mask, "acts", ref)
    return mask.to(torch.float32).contiguous()


def acts_and_grads(acts, grads) -> tuple[torch.Tensor, torch.Tensor]:
    """acts (B, T, d_in) or (B, d_in), grads (B, T, d_out) or (B, d_out): both as 3-D."""
    floating("acts", acts)
    floating("grads", grads)
    ndim("acts", acts, (2, 3), "(B, T, d_in) or (B, d_in)")
    ndim("grads", grads, (2, 3), "(B, T, d_out) or (B, d_out)")
    if acts.dim() != grads.dim():
        raise ValueError(
            f"acts and grads must both be 2-D or both 3-D; got {tuple(acts.shape)} and "
            f"{tuple(grads.shape)}"
        )
    if acts.dim() == 2:
        acts, grads = acts.unsqueeze(1), grads.unsqueeze(1)
    if acts.shape[:2] != grads.shape[:2]:
        raise ValueError(
            f"acts and grads must agree on (B, T); got acts {tuple(acts.shape)} and grads "
            f"{tuple(grads.shape)}"
        )
    if acts.shape[0] == 0 or acts.shape[1] == 0:
        raise ValueError(f"acts must have B >= 1 and T >= 1; got {tuple(acts.shape)}")
    if acts.shape[2] == 0 or grads.shape[2] == 0:
        raise ValueError("acts and grads must have at least one feature (d_in, d_out >= 1)")
    same_device("grads", grads, "acts", acts)
    return acts, grads


def out_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16; got {dtype}")
    return dtype
