"""Loads the native library and gives its ops their fake (meta) implementations.

The schemas live in ``csrc/registration.cpp``; the CPU and CUDA kernels register themselves
from their own files. The fakes below let ``torch.compile`` and FakeTensor tracing see output
shapes without running a kernel. Argument order and meaning match ``grass_kernels.reference``.
"""

from __future__ import annotations

import os

import torch


def _load() -> ImportError | None:
    """Load the op library; returns the error that made it unavailable, if any.

    GRASS_KERNELS_LIBRARY=/path/to/libgrass_kernels.so loads a CMake-built library instead of
    the Python extension (the same ops, see CMakeLists.txt).
    """
    path = os.environ.get("GRASS_KERNELS_LIBRARY")
    try:
        if path:
            torch.ops.load_library(path)
        else:
            from . import _C  # noqa: F401  (importing registers the ops)
    except (ImportError, OSError) as error:
        return ImportError(str(error))
    return None


NATIVE_ERROR = _load()


def native():
    """``torch.ops.grass_kernels``, or a RuntimeError that says how to build it."""
    if NATIVE_ERROR is not None:
        raise RuntimeError(
            "grass_kernels' native extension (grass_kernels._C) is not built: "
            f"{NATIVE_ERROR}. Build it with `pip install --no-build-isolation -e .` in the "
            "repository, or pass backend='reference' (pure torch) or backend='triton'."
        )
    return torch.ops.grass_kernels


def _fp32(like: torch.Tensor, *shape) -> torch.Tensor:
    return like.new_empty(shape, dtype=torch.float32)


if NATIVE_ERROR is None:

    @torch.library.register_fake("grass_kernels::sjlt")
    def _sjlt_fake(x, codes, k):
        return _fp32(x, x.shape[0], k)

    @torch.library.register_fake("grass_kernels::sjlt_transpose")
    def _sjlt_transpose_fake(y, codes):
        return _fp32(y, y.shape[0], codes.shape[0])

    @torch.library.register_fake("grass_kernels::grass")
    def _grass_fake(x, indices, codes, k, scale):
        return _fp32(x, x.shape[0], k)

    @torch.library.register_fake("grass_kernels::logra")
    def _logra_fake(acts, grads, p_in, p_out, token_mask, bias):
        return _fp32(acts, acts.shape[0], p_out.shape[0] * p_in.shape[0])

    @torch.library.register_fake("grass_kernels::fact_grass")
    def _fact_grass_fake(acts, grads, in_indices, out_indices, codes, k, scale, token_mask, bias):
        return _fp32(acts, acts.shape[0], k)

    @torch.library.register_fake("grass_kernels::fact_sjlt")
    def _fact_sjlt_fake(acts, grads, codes_in, codes_out, k_in, k_out, token_mask, bias):
        return _fp32(acts, acts.shape[0], k_out * k_in)
