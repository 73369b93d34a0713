// Helpers shared by the CUDA kernels: element loads, the SJLT scatter of one value, the flush
// of a shared-memory k-vector to global memory, and launch-time sizing (SM count, opt-in
// dynamic shared memory, resident blocks).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <algorithm>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.h"

namespace grass {
namespace cuda {

constexpr int kThreads = 256;
// Dynamic shared memory beyond this needs cudaFuncAttributeMaxDynamicSharedMemorySize.
constexpr int64_t kDefaultSmemBytes = 48 * 1024;

template <typename scalar_t>
__device__ __forceinline__ float to_float(scalar_t v) {
  return static_cast<float>(v);
}

// V consecutive elements, one aligned vector load (V * sizeof(T) bytes, 16 at most).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// v[0..V) = p[0..V) as floats; p must be aligned to V * sizeof(scalar_t) bytes.
template <typename scalar_t, int V>
__device__ __forceinline__ void load_pack(const scalar_t* p, float (&v)[V]) {
  const auto pack = *reinterpret_cast<const Pack<scalar_t, V>*>(p);
#pragma unroll
  for (int e = 0; e < V; ++e) v[e] = to_float(pack.v[e]);
}

// Adds sign_j * v to the c buckets of coordinate `f` (codes row f, int32 (rows, c)). Buckets at
// or beyond k are skipped: the Python layer validates tables, this only keeps a table passed
// straight to torch.ops from writing out of bounds.
__device__ __forceinline__ void sjlt_scatter(float* target, const int32_t* __restrict__ codes,
                                             int64_t f, int c, int64_t k, float v) {
  const int32_t* row = codes + f * c;
  for (int j = 0; j < c; ++j) {
    const int32_t code = __ldg(row + j);
    const int32_t b = code_bucket(code);
    if (b < k) atomicAdd(target + b, code_sign(code) * v);
  }
}

// Writes a block's shared k-vector `acc` into `out` (k floats). The only block writing `out`
// stores (no atomics, deterministic); otherwise non-zero entries are atomically added (out was
// zero-initialised). Call after a __syncthreads that ends the accumulation.
__device__ __forceinline__ void flush_kvector(const float* acc, float* out, int64_t k,
                                              bool sole_writer) {
  for (int64_t b = threadIdx.x; b < k; b += blockDim.x) {
    const float v = acc[b];
    if (sole_writer) {
      out[b] = v;
    } else if (v != 0.0f) {
      atomicAdd(out + b, v);
    }
  }
}

__device__ __forceinline__ void zero_shared(float* acc, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc[i] = 0.0f;
}

// Whether every row (last dimension) of contiguous `t` starts on a 16-byte boundary.
inline bool rows_aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
         (t.size(-1) * static_cast<int64_t>(t.element_size())) % 16 == 0;
}

inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// The most dynamic shared memory one block may use on the current device (opt-in limit).
inline int64_t max_smem_bytes() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
}

// Allows `kernel` to launch with `bytes` of dynamic shared memory (needed above 48 KB).
template <typename Kernel>
void allow_smem(Kernel kernel, int64_t bytes) {
  TORCH_CHECK(bytes <= max_smem_bytes(), "grass_kernels: ", bytes,
              " bytes of shared memory exceed the device limit of ", max_smem_bytes());
  if (bytes > kDefaultSmemBytes) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

// How many blocks of `kernel` (kThreads threads, `smem` bytes) the whole GPU holds at once.
// Call after allow_smem.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, int64_t smem) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                               static_cast<size_t>(smem)));
  return std::max<int64_t>(1, static_cast<int64_t>(per_sm) * sm_count());
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace grass
