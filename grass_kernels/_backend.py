"""The one place that decides which implementation of an op runs.

Backends:
    "reference"  pure torch (``grass_kernels.reference``), any device; the spec
    "cpu"        C++/OpenMP kernels of the native extension, CPU tensors
    "cuda"       CUDA kernels of the native extension, CUDA tensors (not for the ops in
                 ``NO_CUDA_KERNEL``)
    "triton"     Triton kernels (``grass_kernels.triton``), CUDA tensors, or CPU tensors under
                 the Triton interpreter (TRITON_INTERPRET=1, used by the tests)

``backend=None`` picks by the input's device: "cpu" on the CPU; on a GPU the entry of
``GPU_DEFAULT``. Nothing falls back silently: a backend that is asked for and unavailable raises.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from . import reference
from ._library import native

BACKENDS = ("reference", "cpu", "cuda", "triton")

# Defaults on CUDA devices. Not yet measured on a GPU (no device was lent to the sessions so
# far): the CUDA kernels where one exists (shared-memory accumulation instead of global
# atomics), Triton for the dense-GEMM-shaped ops. `bench/gpu_check.py` prints the comparison
# that should set these; update them from its table.
GPU_DEFAULT = {
    "sjlt": "cuda",
    "sjlt_transpose": "cuda",
    "grass": "cuda",
    "logra": "triton",
    "fact_grass": "cuda",
    "fact_sjlt": "triton",
}


# Ops the CUDA backend does not implement, with the reason; backend="cuda" for them raises.
NO_CUDA_KERNEL = {
    "logra": "its projections are dense GEMMs, which the Triton kernel runs on tensor cores",
    "fact_sjlt": "the Triton kernel sketches each side once per token block and multiplies the "
    "sketches; a kernel with one block per output tile re-reads and re-hashes every input once "
    "per tile (bench/README.md counts the cost)",
}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve(op: str, device: torch.device, backend: str | None) -> str:
    """The backend that runs ``op`` on ``device``; raises ValueError for an impossible choice."""
    if backend is None:
        if device.type == "cpu":
            return "cpu"
        if device.type == "cuda":
            return GPU_DEFAULT[op]
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None; got {backend!r}")
    if backend == "cuda" and op in NO_CUDA_KERNEL:
        others = tuple(b for b in BACKENDS if b != "cuda")
        raise ValueError(
            f"{op} has no CUDA kernel ({NO_CUDA_KERNEL[op]}): on CUDA tensors use "
            f"backend='triton' (what backend=None picks) or 'reference'; {op} runs on the "
            f"backends {others}"
        )
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors; the input is on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors; the input is on {device}")
    if backend == "triton" and device.type == "cpu" and not _interpreting():
        raise ValueError(
            "backend='triton' on CPU tensors runs only under the Triton interpreter: set "
            "TRITON_INTERPRET=1 before importing grass_kernels"
        )
    return backend


def implementation(op: str, backend: str) -> Callable[..., torch.Tensor]:
    """The callable for (op, backend); all share the signature of ``reference.<op>``."""
    if backend == "reference":
        return getattr(reference, op)
    if backend == "triton":
        from . import triton as triton_ops  # importing registers the grass_triton ops

        return getattr(triton_ops.ops(), op)
    return getattr(native(), op)


def run(op: str, backend: str | None, device: torch.device, *args) -> torch.Tensor:
    return implementation(op, resolve(op, device, backend))(*args)
