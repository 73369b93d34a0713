// Fused FactGraSS on CUDA: one kernel per call, from (acts, grads) straight to the (B, k)
// compressed gradients, on the params that factorized_ops.cpp checked. Semantics:
// grass_kernels/reference.py (fact_grass).
//
// Grid: x = (example b, 128 x 128 tile of the k_o' x k_i' reduced gradient), y = token split.
// A block stages 32 tokens at a time: the masked columns of acts (times token_mask; the virtual
// bias column d_in reads as the mask value itself) and of grads, gathered through their strides
// (no contiguous copies) and converted to fp32 each from its own dtype into shared memory. It
// accumulates its partial tile over its tokens on CUDA cores (OuterTile), then scatters the
// tile into the SJLT buckets of the example's k-vector, held in shared memory (it reuses the
// staging space), and flushes it with one global atomic per non-zero bucket (plain stores when
// the block is the only one for its example). Partial tiles can be sketched separately because
// the SJLT is linear. When k floats do not fit in shared memory the scatter goes straight to
// global memory with atomics. Nothing of size B * k_o' * k_i' touches global memory.
#include <algorithm>

#include "outer_tile.cuh"

namespace grass {
namespace cuda {
namespace {

// The index in slot `slot` of an index set of `count` entries, or -1 past its end. The op's
// entry point has checked every index against its range before the launch.
__device__ __forceinline__ int64_t tile_index(const int64_t* __restrict__ idx, int64_t slot,
                                              int64_t count) {
  return slot < count ? __ldg(idx + slot) : -1;
}

// act_t, grad_t: the element types of acts and grads (mixed under autocast). tg: the launch's
// grid; scale: the op's scale / sqrt(c); shared: the example's k-vector fits in shared memory.
template <typename act_t, typename grad_t>
__global__ void __launch_bounds__(kThreads)
    fact_grass_kernel(const FactGrassParams p, const TileGrid tg, float scale, bool shared) {
  const Strided3<act_t> acts(p.acts);
  const Strided3<grad_t> grads(p.grads);
  const float* __restrict__ token_mask = p.token_mask;
  const int64_t tokens = p.tokens, d_in = p.d_in, k = p.k;
  const int64_t k_i = p.k_in_masked, k_o = p.k_out_masked;
  const int c = static_cast<int>(p.c);
  const int tiles_i = tg.tiles_i, n_tiles = tg.n_tiles;
  float* __restrict__ out = p.out;
  extern __shared__ float smem[];
  float* xs = smem;                  // [kSteps][kTile]
  float* ds = smem + kSteps * kTile;  // [kSteps][kTile]
  const int64_t b = blockIdx.x / n_tiles;
  const int tile = static_cast<int>(blockIdx.x % n_tiles);
  const int64_t i0 = static_cast<int64_t>(tile % tiles_i) * kTile;
  const int64_t o0 = static_cast<int64_t>(tile / tiles_i) * kTile;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * tg.tokens_per_split;
  const int64_t t_end = std::min(tokens, t_begin + tg.tokens_per_split);

  // This thread stages slot `slot` of both tiles, for token rows lane + u * kLanes.
  constexpr int kLanes = kThreads / kTile;
  constexpr int kRows = kSteps / kLanes;  // token rows staged per thread per step
  const int slot = threadIdx.x % kTile;
  const int lane = threadIdx.x / kTile;
  const int64_t x_col = tile_index(p.in_indices, i0 + slot, k_i);
  const int64_t d_col = tile_index(p.out_indices, o0 + slot, k_o);
  // This slot's columns at token 0 of example b (null past the index sets; the virtual bias
  // column of acts reads the mask value instead): the loop steps them by the token strides.
  const bool x_bias = x_col == d_in;
  const act_t* xp = x_col >= 0 && !x_bias ? acts.column(b, x_col) : nullptr;
  const grad_t* dp = d_col >= 0 ? grads.column(b, d_col) : nullptr;

  OuterTile tile_acc;
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kSteps) {
    // All loads first, then the shared stores: kRows gathers per tensor in flight per thread.
    float xv[kRows], dv[kRows];
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      const int64_t t = t0 + lane + u * kLanes;
      xv[u] = 0.0f;
      dv[u] = 0.0f;
      if (t < t_end) {
        const float m = token_mask ? token_mask[b * tokens + t] : 1.0f;
        if (xp) xv[u] = m * to_float(xp[t * acts.st]);
        if (x_bias) xv[u] = m;
        if (dp) dv[u] = to_float(dp[t * grads.st]);
      }
    }
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      xs[(lane + u * kLanes) * kTile + slot] = xv[u];
      ds[(lane + u * kLanes) * kTile + slot] = dv[u];
    }
    __syncthreads();
    tile_acc.accumulate_staged(xs, ds);
    __syncthreads();
  }

  // The staging buffers are dead now (the loop ended with a barrier): reuse them for the
  // k-vector, when it fits (`shared`); else scatter straight into the output.
  float* target = shared ? smem : out + b * k;
  if (shared) {
    zero_shared(smem, k);
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < kMicro; ++a) {
    const int64_t o = o0 + tile_acc.row(a);
    if (o >= k_o) continue;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t i = i0 + tile_acc.col(j);
      if (i < k_i) sjlt_scatter(target, p.codes, o * k_i + i, c, scale * tile_acc.acc[a][j]);
    }
  }
  if (shared) {
    __syncthreads();
    flush_kvector(smem, out + b * k, k, gridDim.y == 1 && n_tiles == 1);
  }
}

template <typename act_t, typename grad_t>
void launch(const FactGrassParams& p, float scale) {
  auto kernel = fact_grass_kernel<act_t, grad_t>;
  // The k-vector reuses the staging space when it fits in shared memory.
  const bool shared = p.k * 4 <= max_smem_bytes();
  const int64_t smem = std::max<int64_t>(kStagingBytes, shared ? p.k * 4 : 0);
  const TileGrid tg =
      tile_grid(p.batch, p.tokens, p.k_out_masked, p.k_in_masked,
                launch_capacity(reinterpret_cast<const void*>(kernel), smem), "fact_grass");
  kernel<<<tg.grid, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(p, tg, scale, shared);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// fp32 / bf16 / fp16 (the types that mix under autocast), one case per type.
#define GRASS_DISPATCH_MIXABLE(TYPE, NAME, ...)              \
  AT_DISPATCH_SWITCH(TYPE, NAME,                             \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

}  // namespace
}  // namespace cuda

// out (B, k), zeroed: one launch; fp64 acts and grads come only together (the entry checks).
void run_cuda(const FactGrassParams& p) {
  using namespace cuda;
  const float s = static_cast<float>(p.scale / std::sqrt(static_cast<double>(p.c)));
  auto go = [&](auto act_tag, auto grad_tag) {
    launch<decltype(act_tag), decltype(grad_tag)>(p, s);
  };
  if (p.acts.dtype == at::kDouble) {
    go(double{}, double{});
    return;
  }
  GRASS_DISPATCH_MIXABLE(p.acts.dtype, "grass_kernels::fact_grass (CUDA)", [&] {
    using act_t = scalar_t;
    GRASS_DISPATCH_MIXABLE(p.grads.dtype, "grass_kernels::fact_grass (CUDA)",
                           [&] { go(act_t{}, scalar_t{}); });
  });
}

}  // namespace grass
