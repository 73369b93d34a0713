// Fused FactGraSS on CUDA: one kernel per call, from (acts, grads) straight to the (B, k)
// compressed gradients. Semantics: grass_kernels/reference.py (fact_grass).
//
// Grid: x = (example b, 128 x 128 tile of the k_o' x k_i' reduced gradient), y = token split.
// A block stages 32 tokens at a time: the masked columns of acts (times token_mask; the virtual
// bias column d_in reads as the mask value itself) and of grads, gathered into shared memory as
// fp32. It accumulates its partial tile over its tokens on CUDA cores (OuterTile), then
// scatters the tile into the SJLT buckets of the example's k-vector, held in shared memory (it
// reuses the staging space), and flushes it with one global atomic per non-zero bucket (plain
// stores when the block is the only one for its example). Partial tiles can be sketched
// separately because the SJLT is linear. When k floats do not fit in shared memory the scatter
// goes straight to global memory with atomics. Nothing of size B * k_o' * k_i' touches global
// memory.
#include <algorithm>

#include "outer_tile.cuh"

namespace grass {
namespace cuda {
namespace {

// An index into [0, limit), or -1 for slots past the end of the index set and for indices out of
// range (validated in Python; this only keeps a direct torch.ops call from reading out of bounds).
__device__ __forceinline__ int64_t tile_index(const int64_t* __restrict__ idx, int64_t slot,
                                              int64_t count, int64_t limit) {
  if (slot >= count) return -1;
  const int64_t v = __ldg(idx + slot);
  return v >= 0 && v < limit ? v : -1;
}

template <typename scalar_t, bool kShared>
__global__ void __launch_bounds__(kThreads)
    fact_grass_kernel(const scalar_t* __restrict__ acts, const scalar_t* __restrict__ grads,
                      const float* __restrict__ token_mask, const int64_t* __restrict__ in_idx,
                      const int64_t* __restrict__ out_idx, const int32_t* __restrict__ codes,
                      int64_t tokens, int64_t d_in, int64_t d_out, bool bias, int64_t k_i,
                      int64_t k_o, int c, int64_t k, int tiles_i, int n_tiles,
                      int64_t tokens_per_split, float scale, float* __restrict__ out) {
  extern __shared__ float smem[];
  float* xs = smem;                  // [kSteps][kTile]
  float* ds = smem + kSteps * kTile;  // [kSteps][kTile]
  const int64_t b = blockIdx.x / n_tiles;
  const int tile = static_cast<int>(blockIdx.x % n_tiles);
  const int64_t i0 = static_cast<int64_t>(tile % tiles_i) * kTile;
  const int64_t o0 = static_cast<int64_t>(tile / tiles_i) * kTile;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * tokens_per_split;
  const int64_t t_end = std::min(tokens, t_begin + tokens_per_split);

  // This thread stages slot `slot` of both tiles, for token rows lane + u * kLanes.
  constexpr int kLanes = kThreads / kTile;
  constexpr int kRows = kSteps / kLanes;  // token rows staged per thread per step
  const int slot = threadIdx.x % kTile;
  const int lane = threadIdx.x / kTile;
  const int64_t x_col = tile_index(in_idx, i0 + slot, k_i, d_in + (bias ? 1 : 0));
  const int64_t d_col = tile_index(out_idx, o0 + slot, k_o, d_out);
  const scalar_t* xb = acts + b * tokens * d_in;
  const scalar_t* gb = grads + b * tokens * d_out;

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
        if (x_col >= 0) xv[u] = x_col == d_in ? m : m * to_float(xb[t * d_in + x_col]);
        if (d_col >= 0) dv[u] = to_float(gb[t * d_out + d_col]);
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
  // k-vector.
  float* target = kShared ? smem : out + b * k;
  if (kShared) {
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
      if (i < k_i) sjlt_scatter(target, codes, o * k_i + i, c, k, scale * tile_acc.acc[a][j]);
    }
  }
  if (kShared) {
    __syncthreads();
    flush_kvector(smem, out + b * k, k, gridDim.y == 1 && n_tiles == 1);
  }
}

template <typename scalar_t, bool kShared>
void launch(const LinearInputs& in, const at::Tensor& in_idx, const at::Tensor& out_idx,
            const at::Tensor& codes, bool bias, int64_t k, float scale, at::Tensor& out) {
  auto kernel = fact_grass_kernel<scalar_t, kShared>;
  // The k-vector reuses the staging space.
  const int64_t smem = std::max<int64_t>(kStagingBytes, kShared ? k * 4 : 0);
  allow_smem(kernel, smem);
  const TileGrid tg = tile_grid(in.batch(), in.tokens(), out_idx.numel(), in_idx.numel(),
                                resident_blocks(kernel, smem), "fact_grass");
  kernel<<<tg.grid, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      in.acts.data_ptr<scalar_t>(), in.grads.data_ptr<scalar_t>(), in.mask_ptr(),
      in_idx.data_ptr<int64_t>(), out_idx.data_ptr<int64_t>(), codes.data_ptr<int32_t>(),
      in.tokens(), in.acts.size(2), in.grads.size(2), bias, in_idx.numel(), out_idx.numel(),
      static_cast<int>(codes.size(1)), k, tg.tiles_i, tg.n_tiles, tg.tokens_per_split, scale,
      out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor fact_grass(const at::Tensor& acts_in, const at::Tensor& grads_in,
                      const at::Tensor& in_indices, const at::Tensor& out_indices,
                      const at::Tensor& codes_in, int64_t k, double scale,
                      const std::optional<at::Tensor>& token_mask, bool bias) {
  check_linear(acts_in, grads_in, token_mask);
  check_indices(in_indices, "in_indices", acts_in);
  check_indices(out_indices, "out_indices", acts_in);
  check_codes(codes_in, "codes", in_indices.numel() * out_indices.numel(), acts_in);
  check_k(k, codes_in);
  const at::cuda::CUDAGuard guard(acts_in.device());
  const LinearInputs in(acts_in, grads_in, token_mask);
  const at::Tensor in_idx = in_indices.contiguous();
  const at::Tensor out_idx = out_indices.contiguous();
  const at::Tensor codes = codes_in.contiguous();
  at::Tensor out = at::zeros({in.batch(), k}, in.acts.options().dtype(at::kFloat));
  if (in.batch() == 0 || in.tokens() == 0) return out;

  const bool shared = k * 4 <= max_smem_bytes();
  const float s = static_cast<float>(scale / std::sqrt(static_cast<double>(codes.size(1))));
  GRASS_DISPATCH_FLOATING(in.acts.scalar_type(), "grass_kernels::fact_grass (CUDA)", [&] {
    if (shared) {
      launch<scalar_t, true>(in, in_idx, out_idx, codes, bias, k, s, out);
    } else {
      launch<scalar_t, false>(in, in_idx, out_idx, codes, bias, k, s, out);
    }
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace grass

TORCH_LIBRARY_IMPL(grass_kernels, CUDA, m) {
  m.impl("fact_grass", &grass::cuda::fact_grass);
}
