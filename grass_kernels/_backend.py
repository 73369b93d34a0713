"""The one place that decides which implementation of an op runs.

Backends:
    "reference"  pure torch (``grass_kernels.reference``), any device; the spec
    "cpu"        C++/OpenMP kernels of the native extension, CPU tensors
    "cuda"       CUDA kernels of the native extension, CUDA tensors (not for the ops in
                 ``NO_CUDA_KERNEL``), present only when the extension was compiled with nvcc
    "triton"     Triton kernels (``grass_kernels.triton``), CUDA tensors, or CPU tensors under
                 the Triton interpreter (TRITON_INTERPRET=1, used by the tests)

What is present (``Available``) is read once at import into ``AVAILABLE``. ``backend=None``
picks by the input's device: "cpu" on the CPU; on a GPU the entry of ``GPU_DEFAULT``, which is
each op's preferred GPU backend (``PREFERRED_GPU``) when present, else the other kernel backend
that is. Nothing falls back silently: a backend that is asked for and absent raises, and so
does ``backend=None`` when no kernel backend is present for the device, naming the fix.
``backends()`` reports all of this.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from . import reference
from ._library import NATIVE_ERROR, native

BACKENDS = ("reference", "cpu", "cuda", "triton")

# The preferred backend on CUDA devices when it is present: the CUDA kernels where one exists
# (shared-memory accumulation instead of global atomics), Triton for the dense-GEMM-shaped ops.
# `bench/gpu_check.py` prints the comparison that should set these.
PREFERRED_GPU = {
    "sjlt": "cuda",
    "sjlt_transpose": "cuda",
    "grass": "cuda",
    "logra": "triton",
    "fact_grass": "cuda",
    "fact_sjlt": "triton",
}
OPS = tuple(PREFERRED_GPU)

# Ops the CUDA backend does not implement, with the reason; backend="cuda" for them raises.
NO_CUDA_KERNEL = {
    "logra": "its projections are dense GEMMs, which the Triton kernel runs on tensor cores",
    "fact_sjlt": "the Triton kernel sketches each side once per token block and multiplies the "
    "sketches; a kernel with one block per output tile re-reads and re-hashes every input once "
    "per tile (bench/README.md counts the cost)",
}

BUILD_FIX = "`pip install --no-build-isolation -e .` in the repository"
CUDA_BUILD_FIX = f"rebuild with nvcc on PATH ({BUILD_FIX})"
TRITON_FIX = "`pip install triton`"


@dataclass(frozen=True)
class Available:
    """What this install can run. native: the extension loaded (its CPU kernels);
    cuda_kernels: it holds the CUDA kernels; triton: the triton package is importable."""

    native: bool
    cuda_kernels: bool
    triton: bool


def _has_cuda_kernels() -> bool:
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"grass_kernels::{op}", "CUDA")
        for op in OPS
        if op not in NO_CUDA_KERNEL
    )


def detect_available() -> Available:
    """The facts of this process: which library loaded, what it holds, whether Triton imports."""
    native_loaded = NATIVE_ERROR is None
    return Available(
        native=native_loaded,
        cuda_kernels=native_loaded and _has_cuda_kernels(),
        triton=importlib.util.find_spec("triton") is not None,
    )


def _present_on_gpu(op: str, backend: str, available: Available) -> bool:
    if backend == "cuda":
        return available.cuda_kernels and op not in NO_CUDA_KERNEL
    return available.triton


def gpu_defaults(available: Available) -> dict[str, str | None]:
    """op -> the backend ``backend=None`` runs on CUDA tensors; None where none is present."""
    defaults: dict[str, str | None] = {}
    for op, preferred in PREFERRED_GPU.items():
        other = "triton" if preferred == "cuda" else "cuda"
        present = [b for b in (preferred, other) if _present_on_gpu(op, b, available)]
        defaults[op] = present[0] if present else None
    return defaults


AVAILABLE = detect_available()
GPU_DEFAULT = gpu_defaults(AVAILABLE)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _native_missing() -> str:
    return f"the native extension grass_kernels._C is not loaded ({NATIVE_ERROR})"


def _no_default_error(op: str, device: torch.device, available: Available) -> RuntimeError:
    """The one error for backend=None when no kernel backend is present for ``device``."""
    if device.type == "cpu":
        return RuntimeError(
            f"grass_kernels has no kernel for {op} on CPU tensors: {_native_missing()}. "
            f"Fix: build it with {BUILD_FIX}, or pass backend='reference' (pure torch)."
        )
    native_state = (
        "the native extension was built without CUDA kernels"
        if available.native
        else _native_missing()
    )
    cuda_fix = "" if op in NO_CUDA_KERNEL else f", or {CUDA_BUILD_FIX}"
    return RuntimeError(
        f"grass_kernels has no kernel for {op} on CUDA tensors: {native_state} and Triton is "
        f"not installed. Fix: {TRITON_FIX}{cuda_fix}; or pass backend='reference' (pure torch)."
    )


def choose(op: str, device: torch.device, backend: str | None, available: Available) -> str:
    """The backend that runs ``op`` on ``device`` given what is ``available``.

    ValueError for a choice no install could run (unknown name, wrong device, an op the backend
    lacks); RuntimeError, naming the fix, for a backend this install lacks.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None; got {backend!r}")
    if backend is None:
        if device.type == "cpu":
            backend = "cpu" if available.native else None
        elif device.type == "cuda":
            backend = gpu_defaults(available)[op]
        else:
            return "reference"
        if backend is None:
            raise _no_default_error(op, device, available)
        return backend
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
    if backend == "cpu" and not available.native:
        raise RuntimeError(f"backend='cpu' is not available: {_native_missing()}. "
                           f"Fix: build it with {BUILD_FIX}.")
    if backend == "cuda" and not available.cuda_kernels:
        state = "it was built without them" if available.native else _native_missing()
        raise RuntimeError(f"backend='cuda' is not available: the native extension has no CUDA "
                           f"kernels ({state}). Fix: {CUDA_BUILD_FIX}.")
    if backend == "triton" and not available.triton:
        raise RuntimeError(f"backend='triton' is not available: Triton is not installed. "
                           f"Fix: {TRITON_FIX}.")
    return backend


def resolve(op: str, device: torch.device, backend: str | None) -> str:
    """The backend that runs ``op`` on ``device`` in this install (see ``choose``)."""
    return choose(op, device, backend, AVAILABLE)


def backends(available: Available | None = None) -> dict:
    """What is built and what ``backend=None`` runs for each op on each device.

    Returns {"available": {"native": bool, "cuda_kernels": bool, "triton": bool},
    "cpu": {op: backend or None}, "cuda": {op: backend or None}}; None marks an op that would
    raise (no kernel backend present). ``available`` defaults to this install's.
    """
    available = AVAILABLE if available is None else available
    cpu_default = "cpu" if available.native else None
    return {
        "available": asdict(available),
        "cpu": {op: cpu_default for op in OPS},
        "cuda": gpu_defaults(available),
    }


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
