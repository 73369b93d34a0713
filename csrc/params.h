// The arguments of each kernel family once an op's entry point (flat_ops.cpp, factorized_ops.cpp)
// has checked them: raw pointers into tensors that the entry point keeps alive for the call,
// sizes, and strides in elements. The CPU and the CUDA kernel of a family take the same struct
// (a CUDA kernel by value, as its argument), declared here as run_cpu / run_cuda overloads.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace grass {

// A (rows, cols) or (B, T, d) input read in place: element (b, t, i) at
// b * sb + t * st + i * sd (a 2-D input uses st for rows and sd for columns, sb = 0).
struct InputView {
  const void* data;
  at::ScalarType dtype;  // fp32, bf16, fp16 (fp64 for direct C++ callers)
  int64_t sb, st, sd;
};

// sjlt and grass: out[n, b_j(m)] += s_j(m) * scale * x[n, col(m)] over table rows m < cols and
// copies j < c, where col(m) = m (sjlt) or columns[m] (grass).
struct FlatParams {
  InputView x;               // (rows, width)
  int64_t rows, width;
  int64_t cols;              // table rows: width (sjlt) or k' (grass)
  const int64_t* columns;    // grass: (k') columns of x, each in [0, width); sjlt: nullptr
  const int32_t* codes;      // (cols, c) SJLT codes, contiguous, buckets in [0, k)
  int64_t c, k;
  float scale;               // 1 / sqrt(c), times grass's mask scale
  float* out;                // (rows, k) fp32, contiguous, uninitialised
};

// sjlt_transpose: out[n, i] = scale * sum_j s_j(i) y[n, b_j(i)].
struct TransposeParams {
  InputView y;               // (rows, k), contiguous
  int64_t rows, k;
  const int32_t* codes;      // (d, c) SJLT codes, contiguous, buckets in [0, k)
  int64_t d, c;
  float scale;               // 1 / sqrt(c)
  float* out;                // (rows, d) fp32, contiguous, uninitialised
};

// What the factorized ops share: per example b, sum over tokens t of the outer product of
// grads[b, t] (d_out) and m[b, t] * [acts[b, t], 1 if bias] (d_in + bias), compressed.
struct LinearParams {
  InputView acts, grads;     // (B, T, d_in), (B, T, d_out), any strides, dtypes may differ
  int64_t batch, tokens, d_in, d_out;
  const float* token_mask;   // (B, T) fp32, contiguous; nullptr: every token weighs 1
  bool bias;                 // a virtual input column d_in that reads 1.0
  float* out;                // (B, width) fp32, contiguous, zeroed
};

// fact_grass: the k_o' x k_i' masked block of each example's gradient, SJLT-sketched to k.
struct FactGrassParams : LinearParams {
  const int64_t* in_indices;   // (k_i') in [0, d_in + bias), contiguous
  const int64_t* out_indices;  // (k_o') in [0, d_out), contiguous
  int64_t k_in_masked, k_out_masked;
  const int32_t* codes;        // (k_o' * k_i', c), contiguous, buckets in [0, k)
  int64_t c, k;
  double scale;                // the op's scale (1 / sqrt(c) is applied by the kernels)
};

// logra: P_out G_i P_in^T, flattened (k_out, k_in).
struct LograParams : LinearParams {
  const float* p_in;           // (k_in, d_in + bias) fp32, contiguous
  const float* p_out;          // (k_out, d_out) fp32, contiguous
  int64_t k_in, k_out;
};

// fact_sjlt: SJLT_out G_i SJLT_in^T, flattened (k_out, k_in).
struct FactSjltParams : LinearParams {
  const int32_t* codes_in;     // (d_in + bias, c_in), contiguous, buckets in [0, k_in)
  const int32_t* codes_out;    // (d_out, c_out), contiguous, buckets in [0, k_out)
  int64_t c_in, c_out, k_in, k_out;
};

// The CPU kernels (csrc/cpu).
void run_cpu(const FlatParams& p);
void run_cpu(const TransposeParams& p);
void run_cpu(const FactGrassParams& p);
void run_cpu(const LograParams& p);
void run_cpu(const FactSjltParams& p);

#ifdef GRASS_WITH_CUDA
// The CUDA kernels (csrc/cuda), on the current device and stream.
void run_cuda(const FlatParams& p);
void run_cuda(const TransposeParams& p);
void run_cuda(const FactGrassParams& p);
#endif

// The view of a 2-D or 3-D tensor (a 2-D tensor's rows in st, its columns in sd).
inline InputView view_of(const at::Tensor& t) {
  const bool three = t.dim() == 3;
  return {t.data_ptr(), t.scalar_type(), three ? t.stride(0) : 0, t.stride(three ? 1 : 0),
          t.stride(three ? 2 : 1)};
}

// Runs the kernel of params' family on the device of `ref`, the op's first input.
template <typename Params>
void run_on_device(const at::Tensor& ref, const Params& p) {
#ifdef GRASS_WITH_CUDA
  if (ref.is_cuda()) {
    const c10::DeviceGuard guard(ref.device());
    return run_cuda(p);
  }
#endif
  TORCH_CHECK(ref.is_cpu(), "grass_kernels was built without kernels for ", ref.device());
  run_cpu(p);
}

}  // namespace grass
