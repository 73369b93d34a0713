"""A cheap digest of a model's weights, computed where they live and invariant to sharding.

Every parameter and buffer contributes its name, dtype and global shape, and two int64
checksums of its bytes, computed on its own device by two reductions (no host copy of the
model): read as words q_j of up to 8 bytes at flat global word index j, S1 = sum_j q_j and
S2 = sum_j (j + 1) q_j, wrapping mod 2^64. Changing any one element changes one word by a
non-zero amount times a power of two below 2^64, so S1 changes; moving values between words
changes S2. Integer sums are exact, so the order of summation (sharding) does not matter.

A DTensor (FSDP2, tensor parallel) sums over its local shard with the global indices of that
shard; replicated mesh dimensions count on their first coordinate only. One all-reduce (SUM)
of the (P, 2) int64 sums then gives every rank the checksums of the whole tensor: the same
digest as the unsharded model, whatever the world size or placement.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn

# Integer types of each word width.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support
        return None
    return DTensor


def _is_dtensor(t: torch.Tensor) -> bool:
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(t, dtensor)


def _local_part(t: torch.Tensor, reduced: bool) -> tuple[torch.Tensor, tuple[int, ...], bool]:
    """(local tensor, offset of its first element in each global dimension, counts here).

    ``counts`` is False on ranks holding a replica that another rank already counts; when the
    sums are ``reduced`` over ranks, a plain tensor (a replicated buffer) counts on rank 0."""
    if not _is_dtensor(t):
        return t, (0,) * t.dim(), not reduced or dist.get_rank() == 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import Replicate, Shard

    mesh = t.device_mesh
    coordinate = mesh.get_coordinate()
    counts = coordinate is not None
    for dim, placement in enumerate(t.placements):
        if isinstance(placement, Replicate):
            counts = counts and coordinate[dim] == 0
        elif not isinstance(placement, Shard):
            raise ValueError(f"the model fingerprint needs Shard or Replicate placements; a "
                             f"parameter has {placement}: redistribute it first")
    _, offset = compute_local_shape_and_global_offset(t.shape, mesh, t.placements)
    return t.to_local(), tuple(offset), counts


def _word_width(global_shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes per checksum word: the widest of 8, 4, 2, 1 that divides a global row (all dims
    but the first), so that every dim-0 shard starts on a word; from global facts only, so the
    same on every rank and unsharded."""
    row = itemsize
    for size in global_shape[1:]:
        row *= size
    return next(w for w in (8, 4, 2, 1) if row % w == 0)


def _words(local: torch.Tensor, width: int) -> torch.Tensor:
    """The local tensor's bytes as a flat tensor of ``width``-byte signed integers."""
    flat = local.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    try:
        return flat.view(torch.uint8).view(_BITS[width])
    except RuntimeError:  # a view whose storage offset is not word-aligned: align a copy
        return flat.clone().view(torch.uint8).view(_BITS[width])


def _checksums(t: torch.Tensor, reduced: bool) -> torch.Tensor:
    """(2,) int64 [S1, S2] of this rank's part of one tensor, on its device."""
    global_shape = tuple(t.shape)
    local, offset, counts = _local_part(t, reduced)
    sums = torch.zeros(2, dtype=torch.int64, device=local.device)
    if not counts or local.numel() == 0:
        return sums
    if any(offset[1:]) or tuple(local.shape[1:]) != global_shape[1:]:
        raise ValueError(f"the model fingerprint handles tensors sharded along dim 0 (FSDP); a "
                         f"parameter of shape {global_shape} has a local part {tuple(local.shape)}"
                         f" at offset {offset}: redistribute it first")
    width = _word_width(global_shape, local.element_size())
    words = _words(local, width)
    row_words = words.numel() // max(1, local.shape[0]) if local.dim() else words.numel()
    first = (offset[0] if local.dim() else 0) * row_words  # global index of the first word
    # sum_j (first + j + 1) q_j over local word j, without a (n,) index tensor: the words as
    # a (rows, C) matrix give sum_j j q_j = C * sum_r r R_r + sum_c c K_c from its row sums R
    # and column sums K; the last n mod C words are weighted one by one.
    cols = 1024
    full = words.numel() // cols * cols
    matrix, tail = words[:full].reshape(-1, cols), words[full:]
    row_sums, col_sums = matrix.sum(1, dtype=torch.int64), matrix.sum(0, dtype=torch.int64)

    def arange(n: int) -> torch.Tensor:
        return torch.arange(n, dtype=torch.int64, device=local.device)

    total = row_sums.sum() + tail.sum(dtype=torch.int64)
    weighted = (cols * (arange(row_sums.numel()) * row_sums).sum()
                + (arange(cols) * col_sums).sum()
                + ((arange(tail.numel()) + full) * tail.to(torch.int64)).sum())
    sums[0] = total
    sums[1] = (first + 1) * total + weighted
    return sums


def model_fingerprint(model: nn.Module) -> str:
    """A hex digest of ``model``'s parameters and buffers (names, dtypes, global shapes and
    checksums of their values); the same for the model and any sharding of it."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    # Sharded tensors need their shards' sums added over ranks (a mesh over all ranks).
    reduced = dist.is_available() and dist.is_initialized() and any(
        _is_dtensor(t) for _, t in named)
    header = [f"{name}:{t.dtype}:{tuple(t.shape)}" for name, t in named]
    sums = [_checksums(t, reduced) for _, t in named]
    if not sums:
        return hashlib.blake2b(b"no parameters", digest_size=16).hexdigest()
    # One small tensor per device: stack on the first one (a model on one device: no copy
    # beyond 16 bytes per tensor).
    device = sums[0].device
    table = torch.stack([s.to(device) for s in sums])  # (P, 2) int64
    if reduced:
        # Shards add up to the whole tensor's sums; nccl needs the table on the rank's GPU.
        if dist.get_backend() == "nccl":
            table = table.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(table, op=dist.ReduceOp.SUM)
    digest = hashlib.blake2b(digest_size=16)
    digest.update("\n".join(header).encode())
    digest.update(table.cpu().numpy().tobytes())
    return digest.hexdigest()
