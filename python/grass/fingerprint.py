"""A cheap digest of a model's weights, computed where they live and invariant to sharding.

Every parameter and buffer contributes its name, dtype and global shape, and two int64
checksums of its bits, computed on its own device in bounded chunks (no host copy of the
model): S1 = sum_j bits_j and S2 = sum_j bits_j * (j + 1) over the tensor's flat global index j,
wrapping mod 2^64. Changing any one element changes S1 (its bit pattern differs by less than
2^64); moving values between elements changes S2.

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

# Elements per chunk: bounds the int64 temporaries (8 bytes each) at 128 MB per chunk.
_CHUNK = 1 << 24
# Integer views of the bits of each floating dtype (same itemsize).
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


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as signed integers of the same width, flat."""
    t = t.detach().contiguous().reshape(-1)
    if t.is_complex():
        t = torch.view_as_real(t).reshape(-1)
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    return t.view(_BITS[t.element_size()]) if t.is_floating_point() else t


def _checksums(t: torch.Tensor, reduced: bool) -> torch.Tensor:
    """(2,) int64 [S1, S2] of this rank's part of one tensor, on its device."""
    global_shape = tuple(t.shape)
    local, offset, counts = _local_part(t, reduced)
    sums = torch.zeros(2, dtype=torch.int64, device=local.device)
    if not counts or local.numel() == 0:
        return sums
    if local.dim() == 0:
        local, offset, global_shape = local.reshape(1), (0,), (1,)
    bits = _bits(local).reshape(local.shape)
    # Global flat index of local element (i_0, ..., i_d): sum_d (offset_d + i_d) * stride_d.
    strides = [1] * len(global_shape)
    for d in range(len(global_shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * global_shape[d + 1]
    rows = max(1, _CHUNK // max(1, local[0].numel()))
    for start in range(0, local.shape[0], rows):
        part = bits[start:start + rows].to(torch.int64)
        index = torch.zeros((), dtype=torch.int64, device=local.device)
        for d, size in enumerate(part.shape):
            first = offset[d] + (start if d == 0 else 0)
            axis = torch.arange(first, first + size, device=local.device) * strides[d]
            index = index + axis.reshape([-1 if e == d else 1 for e in range(part.dim())])
        sums[0] += part.sum()
        sums[1] += (part * (index + 1)).sum()
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
