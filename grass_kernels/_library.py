"""Loads the native library and gives its ops their fake (meta) implementations.

The schemas live in ``csrc/registration.cpp``; each op's one entry point (``csrc/flat_ops.cpp``,
``csrc/factorized_ops.cpp``) registers itself for CPU and, in CUDA builds, for CUDA. The fakes below let ``torch.compile`` and FakeTensor tracing see output
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


# The fakes check what their output shape relies on (``torch._check_type`` for a dtype,
# ``torch._check_value`` for a shape, as the kernels raise TypeError / ValueError) so that a traced
# call fails at trace time on the same mistakes the kernels reject (the value checks of tables,
# which need the data, stay with the kernels).


def _check_matrix(name: str, t: torch.Tensor) -> None:
    torch._check_type(t.is_floating_point(), lambda: f"{name} must be floating, got {t.dtype}")
    torch._check_value(t.dim() == 2, lambda: f"{name} must be 2-D, got {t.shape}")


def _check_codes(codes: torch.Tensor, rows, k) -> None:
    """codes int32 (rows, c) with 1 <= c <= k; rows None: any."""
    torch._check_type(codes.dtype == torch.int32, lambda: f"codes must be int32, got {codes.dtype}")
    torch._check_value(codes.dim() == 2, lambda: f"codes must be 2-D (rows, c), got {codes.shape}")
    if rows is not None:
        torch._check_value(codes.shape[0] == rows, lambda: f"codes must have {rows} rows")
    torch._check_value(k >= 1, lambda: f"k must be positive, got {k}")
    torch._check_value(codes.shape[1] <= k, lambda: f"codes has c = {codes.shape[1]} copies "
                       f"per coordinate but k = {k} (need c <= k)")


def _check_linear(acts: torch.Tensor, grads: torch.Tensor, token_mask) -> None:
    """acts (B, T, d_in), grads (B, T, d_out) floating, token_mask None or fp32 (B, T)."""
    torch._check_type(acts.is_floating_point() and grads.is_floating_point(),
                 lambda: "acts and grads must be floating")
    torch._check_value(acts.dim() == 3 and grads.dim() == 3, lambda: "acts and grads must be 3-D")
    torch._check_value(acts.shape[:2] == grads.shape[:2],
                       lambda: "acts and grads must agree on (B, T)")
    if token_mask is not None:
        torch._check_type(token_mask.dtype == torch.float32, lambda: "token_mask must be float32")
        torch._check_value(token_mask.shape == acts.shape[:2], lambda: "token_mask must be (B, T)")


def _check_indices(indices: torch.Tensor) -> None:
    torch._check_type(indices.dtype == torch.int64,
                      lambda: f"indices must be int64, got {indices.dtype}")
    torch._check_value(indices.dim() == 1, lambda: "indices must be 1-D")


if NATIVE_ERROR is None:

    @torch.library.register_fake("grass_kernels::sjlt")
    def _sjlt_fake(x, codes, k):
        _check_matrix("x", x)
        _check_codes(codes, x.shape[1], k)
        return _fp32(x, x.shape[0], k)

    @torch.library.register_fake("grass_kernels::sjlt_transpose")
    def _sjlt_transpose_fake(y, codes):
        _check_matrix("y", y)
        _check_codes(codes, None, y.shape[1])
        return _fp32(y, y.shape[0], codes.shape[0])

    @torch.library.register_fake("grass_kernels::grass")
    def _grass_fake(x, indices, codes, k, scale):
        _check_matrix("x", x)
        _check_indices(indices)
        _check_codes(codes, indices.shape[0], k)
        return _fp32(x, x.shape[0], k)

    @torch.library.register_fake("grass_kernels::logra")
    def _logra_fake(acts, grads, p_in, p_out, token_mask, bias):
        _check_linear(acts, grads, token_mask)
        torch._check_value(p_in.dim() == 2 and p_in.shape[1] == acts.shape[2] + bias,
                     lambda: "p_in must be (k_in, d_in + bias)")
        torch._check_value(p_out.dim() == 2 and p_out.shape[1] == grads.shape[2],
                     lambda: "p_out must be (k_out, d_out)")
        return _fp32(acts, acts.shape[0], p_out.shape[0] * p_in.shape[0])

    @torch.library.register_fake("grass_kernels::fact_grass")
    def _fact_grass_fake(acts, grads, in_indices, out_indices, codes, k, scale, token_mask, bias):
        _check_linear(acts, grads, token_mask)
        _check_indices(in_indices)
        _check_indices(out_indices)
        _check_codes(codes, in_indices.shape[0] * out_indices.shape[0], k)
        return _fp32(acts, acts.shape[0], k)

    @torch.library.register_fake("grass_kernels::fact_sjlt")
    def _fact_sjlt_fake(acts, grads, codes_in, codes_out, k_in, k_out, token_mask, bias):
        _check_linear(acts, grads, token_mask)
        _check_codes(codes_in, acts.shape[2] + bias, k_in)
        _check_codes(codes_out, grads.shape[2], k_out)
        return _fp32(acts, acts.shape[0], k_out * k_in)
