// Helpers shared by the CUDA kernels: element and vector loads (and the alignment test for the
// latter), the SJLT scatter of one value, the flush of a shared-memory k-vector to global
// memory, and launch-time sizing (SM count, opt-in dynamic shared memory, resident blocks,
// cached per kernel and device).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
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

// Whether load_pack can read rows that start at p, row_bytes apart, at every multiple of 16
// bytes into a row (16-byte vector loads).
inline bool vector_aligned(const void* p, int64_t row_bytes) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && row_bytes % 16 == 0;
}

// Adds sign_j * v to the c buckets of coordinate `f` (codes row f, int32 (rows, c)). The op's
// entry point has checked every bucket against k (check_ranges) before the launch.
__device__ __forceinline__ void sjlt_scatter(float* target, const int32_t* __restrict__ codes,
                                             int64_t f, int c, float v) {
  const int32_t* row = codes + f * c;
  for (int j = 0; j < c; ++j) {
    const int32_t code = __ldg(row + j);
    atomicAdd(target + code_bucket(code), code_sign(code) * v);
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

inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// The most dynamic shared memory one block may use on the current device (opt-in limit).
inline int64_t max_smem_bytes() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
}

// How many blocks of the kernel at `kernel` (kThreads threads, `smem` bytes of dynamic shared
// memory) the current GPU holds at once, after allowing it shared memory up to the device's
// opt-in limit (needed above 48 KB). Both driver calls run once per (kernel, device, smem) and
// are cached: per-layer calls are small, and the queries would otherwise be a fixed host cost
// on each.
inline int64_t launch_capacity(const void* kernel, int64_t smem) {
  const int device = c10::cuda::current_device();
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int64_t>, int64_t> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(kernel, device, smem);
  if (const auto hit = cache.find(key); hit != cache.end()) return hit->second;
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  // The opt-in limit covers the kernel's static shared memory and the dynamic part together.
  const int64_t dynamic_limit =
      max_smem_bytes() - static_cast<int64_t>(attributes.sharedSizeBytes);
  TORCH_CHECK(smem <= dynamic_limit, "grass_kernels: ", smem,
              " bytes of dynamic shared memory exceed the device limit of ", dynamic_limit);
  if (smem > kDefaultSmemBytes) {
    // Always the limit itself, not smem: a cached launch with more shared memory than a later
    // call asked for must stay allowed.
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(dynamic_limit)));
  }
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                               static_cast<size_t>(smem)));
  const int64_t blocks = std::max<int64_t>(1, static_cast<int64_t>(per_sm) * sm_count());
  cache.emplace(key, blocks);
  return blocks;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace grass
