// Shared by the CPU (.cpp) and CUDA (.cu) kernels: SJLT code decoding, dtype dispatch, and the
// argument checks every op repeats at the C++ boundary (the Python layer checks values too, but
// an op called directly through torch.ops must still fail cleanly, never read out of bounds).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GRASS_HD __host__ __device__ __forceinline__
#else
#define GRASS_HD inline
#endif

namespace grass {

// SJLT codes (grass_kernels/_tables.py): bucket b with sign +1 is stored as b, with sign -1 as
// ~b. One int32 per (coordinate, copy).
GRASS_HD int32_t code_bucket(int32_t code) { return code >= 0 ? code : ~code; }
GRASS_HD float code_sign(int32_t code) { return code >= 0 ? 1.0f : -1.0f; }

// fp32, bf16, fp16 inputs (fp64 compiles too, for direct C++ callers).
#define GRASS_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

inline void check_float(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.is_floating_point(), name, " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but the input is on ",
              ref.device());
}

// codes: int32 (rows, c) on ref's device.
inline void check_codes(const at::Tensor& codes, const char* name, int64_t rows,
                        const at::Tensor& ref) {
  TORCH_CHECK(codes.scalar_type() == at::kInt, name, " must be int32, got ", codes.scalar_type());
  TORCH_CHECK(codes.dim() == 2 && codes.size(0) == rows && codes.size(1) >= 1, name,
              " must have shape (", rows, ", c), got ", codes.sizes());
  check_same_device(codes, name, ref);
}

// k outputs for codes with c = codes.size(1) copies per coordinate: 1 <= c <= k (ValueError).
inline void check_k(int64_t k, const at::Tensor& codes, const char* name = "k") {
  TORCH_CHECK_VALUE(k >= 1, name, " must be positive, got ", k);
  TORCH_CHECK_VALUE(codes.size(1) <= k, "codes has c = ", codes.size(1),
                    " copies per coordinate but ", name, " = ", k, " (need c <= ", name, ")");
}

// indices: int64 (n) on ref's device.
inline void check_indices(const at::Tensor& idx, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(idx.scalar_type() == at::kLong, name, " must be int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 1 && idx.numel() >= 1, name, " must be a non-empty 1-D tensor");
  check_same_device(idx, name, ref);
}

// acts (B, T, d_in), grads (B, T, d_out), optional token_mask (B, T) fp32.
inline void check_linear(const at::Tensor& acts, const at::Tensor& grads,
                         const std::optional<at::Tensor>& token_mask) {
  check_float(acts, "acts", 3);
  check_float(grads, "grads", 3);
  check_same_device(grads, "grads", acts);
  TORCH_CHECK(acts.size(0) == grads.size(0) && acts.size(1) == grads.size(1),
              "acts and grads must agree on (B, T), got ", acts.sizes(), " and ", grads.sizes());
  if (token_mask.has_value()) {
    const auto& m = *token_mask;
    TORCH_CHECK(m.scalar_type() == at::kFloat, "token_mask must be float32");
    TORCH_CHECK(m.dim() == 2 && m.size(0) == acts.size(0) && m.size(1) == acts.size(1),
                "token_mask must have shape (B, T), got ", m.sizes());
    check_same_device(m, "token_mask", acts);
  }
}

}  // namespace grass
