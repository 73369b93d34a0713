// Shared by the CPU (.cpp) and CUDA (.cu) code: SJLT code decoding, dtype dispatch, and the
// argument checks of the ops' entry points (flat_ops.cpp, factorized_ops.cpp), which run them
// once per call for every device (the Python layer checks values too, but an op called directly
// through torch.ops must still fail cleanly, never read out of bounds). A wrong dtype raises
// TypeError (TORCH_CHECK_TYPE), a wrong shape, device or value ValueError (TORCH_CHECK_VALUE),
// as the Python checks do.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

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
  TORCH_CHECK_TYPE(t.is_floating_point(), name, " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but the input is on ",
              ref.device());
}

// codes: int32 (rows, c) on ref's device.
inline void check_codes(const at::Tensor& codes, const char* name, int64_t rows,
                        const at::Tensor& ref) {
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kInt, name, " must be int32, got ", codes.scalar_type());
  TORCH_CHECK_VALUE(codes.dim() == 2 && codes.size(0) == rows && codes.size(1) >= 1, name,
              " must have shape (", rows, ", c), got ", codes.sizes());
  check_same_device(codes, name, ref);
}

// k outputs for codes with c = codes.size(1) copies per coordinate: 1 <= c <= k (ValueError).
inline void check_k(int64_t k, const at::Tensor& codes, const char* name = "k") {
  TORCH_CHECK_VALUE(k >= 1, name, " must be positive, got ", k);
  TORCH_CHECK_VALUE(codes.size(1) <= k, "codes has c = ", codes.size(1),
                    " copies per coordinate but ", name, " = ", k, " (need c <= ", name, ")");
}

// A table whose values must lie in a range before any kernel reads through it. Codes: every
// decoded bucket in [0, limit); indices: every value in [0, limit).
struct RangeCheck {
  const at::Tensor& values;  // int32 codes (rows, c) or int64 indices (n), any device
  const char* name;
  int64_t limit;
  const char* limit_name;  // codes: the name of k in the message ("k", "k_in", ...)
  bool codes;
};

// {min, max} of a CPU table of up to kLoopRange values, by a plain loop: small tables are the
// per-layer case, where a reduction kernel's dispatch would cost more than the loop.
constexpr int64_t kLoopRange = int64_t{1} << 20;

// The count and the pointer are locals, so the loop vectorises wherever it is compiled.
template <typename T>
std::pair<int64_t, int64_t> loop_range(const at::Tensor& values) {
  const at::Tensor v = values.contiguous();
  const T* __restrict p = v.data_ptr<T>();
  const int64_t n = v.numel();
  T lo = p[0], hi = p[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = p[i] < lo ? p[i] : lo;
    hi = p[i] > hi ? p[i] : hi;
  }
  return {lo, hi};
}

// Raises ValueError naming the first table out of range. Small CPU tables are scanned in place;
// the others get one reduction (aminmax) each on their device and one device-to-host copy for
// all of them. Nothing reads out of bounds, and the CPU and CUDA kernels raise the same error
// for the same mistake.
inline void check_ranges(std::initializer_list<RangeCheck> checks) {
  std::vector<std::pair<int64_t, int64_t>> ranges(checks.size(), {0, 0});
  std::vector<at::Tensor> reduced;  // (2,) int64 {min, max} of the tables not scanned here
  std::vector<size_t> reduced_at;
  size_t i = 0;
  for (const auto& ch : checks) {
    const int64_t n = ch.values.numel();
    const bool loop = ch.values.is_cpu() && n <= kLoopRange;
    if (n > 0 && loop && ch.values.scalar_type() == at::kInt) {
      ranges[i] = loop_range<int32_t>(ch.values);
    } else if (n > 0 && loop && ch.values.scalar_type() == at::kLong) {
      ranges[i] = loop_range<int64_t>(ch.values);
    } else if (n > 0) {
      const auto [lo, hi] = at::aminmax(ch.values);
      reduced.push_back(at::stack({lo.to(at::kLong), hi.to(at::kLong)}));
      reduced_at.push_back(i);
    }
    ++i;
  }
  if (!reduced.empty()) {
    const at::Tensor host = at::cat(reduced).cpu();
    const int64_t* b = host.data_ptr<int64_t>();
    for (size_t j = 0; j < reduced_at.size(); ++j) ranges[reduced_at[j]] = {b[2 * j], b[2 * j + 1]};
  }
  i = 0;
  for (const auto& ch : checks) {
    const auto [lo, hi] = ranges[i++];
    if (ch.values.numel() == 0) continue;
    if (ch.codes) {
      // Bucket ~code for a negative code: the most negative code holds the largest such bucket.
      const int64_t top = std::max(hi, ~lo);
      TORCH_CHECK_VALUE(top < ch.limit, ch.name, " must hold buckets in [0, ", ch.limit_name,
                        " = ", ch.limit, "); found bucket ", top);
    } else {
      TORCH_CHECK_VALUE(lo >= 0 && hi < ch.limit, ch.name, " must lie in [0, ", ch.limit,
                        "), got values in [", lo, ", ", hi, "]");
    }
  }
}

// indices: int64 (n) on ref's device.
inline void check_indices(const at::Tensor& idx, const char* name, const at::Tensor& ref) {
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, name, " must be int64, got ", idx.scalar_type());
  TORCH_CHECK_VALUE(idx.dim() == 1 && idx.numel() >= 1, name, " must be a non-empty 1-D tensor");
  check_same_device(idx, name, ref);
}

// acts (B, T, d_in), grads (B, T, d_out), optional token_mask (B, T) fp32.
inline void check_linear(const at::Tensor& acts, const at::Tensor& grads,
                         const std::optional<at::Tensor>& token_mask) {
  check_float(acts, "acts", 3);
  check_float(grads, "grads", 3);
  check_same_device(grads, "grads", acts);
  TORCH_CHECK_VALUE(acts.size(0) == grads.size(0) && acts.size(1) == grads.size(1),
              "acts and grads must agree on (B, T), got ", acts.sizes(), " and ", grads.sizes());
  TORCH_CHECK_VALUE(acts.size(0) >= 1 && acts.size(1) >= 1,
                    "acts must have B >= 1 and T >= 1; got ", acts.sizes());
  if (token_mask.has_value()) {
    const auto& m = *token_mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kFloat, "token_mask must be float32");
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == acts.size(0) && m.size(1) == acts.size(1),
                "token_mask must have shape (B, T), got ", m.sizes());
    check_same_device(m, "token_mask", acts);
  }
}

}  // namespace grass
