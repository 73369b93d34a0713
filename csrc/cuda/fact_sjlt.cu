// Fused FactSJLT on CUDA: one kernel per call, (acts, grads) -> (B, k_out * k_in).
// Semantics: grass_kernels/reference.py (fact_sjlt).
//
// Grid: x = (example b, 128 x 128 tile of the k_out x k_in output), y = token split. A block
// stages 32 tokens at a time: it hashes every coordinate of each token's x (times token_mask;
// the virtual bias column reads as the mask value) and delta into its tile's SJLT buckets,
// adding into shared memory (buckets outside the tile are skipped), then accumulates the outer
// products on CUDA cores (OuterTile) and writes its tile: plain stores when it is the only
// token split, else atomics into the zero-initialised output. The per-token sketches never
// touch global memory.
#include <algorithm>
#include <type_traits>

#include "outer_tile.cuh"

namespace grass {
namespace cuda {
namespace {

// Adds sign * v to the buckets of coordinate e that fall in [lo, lo + kTile) of row `staged`.
__device__ __forceinline__ void hash_into_tile(float* staged, const int32_t* __restrict__ codes,
                                               int64_t e, int c, int64_t lo, int64_t width,
                                               float v) {
  const int32_t* row = codes + e * c;
  for (int j = 0; j < c; ++j) {
    const int32_t code = __ldg(row + j);
    const int64_t b = code_bucket(code) - lo;
    if (b >= 0 && b < width) atomicAdd(staged + b, code_sign(code) * v);
  }
}

// Hashes m * row[0..d) (plus the bias column d reading m, when bias) into one staged token row.
// Each thread loads kUnroll vectors of V elements (16 bytes when the rows are aligned) before
// scattering them, so that enough bytes are in flight to stream the rows at memory speed.
template <typename scalar_t, int V>
__device__ __forceinline__ void hash_row(float* staged, const scalar_t* __restrict__ row,
                                         int64_t d, bool bias, float m,
                                         const int32_t* __restrict__ codes, int c, int64_t lo,
                                         int64_t width) {
  constexpr int kUnroll = 4;
  const int64_t n = d + (bias ? 1 : 0);
  const int64_t step = static_cast<int64_t>(blockDim.x) * V;
  for (int64_t e0 = static_cast<int64_t>(threadIdx.x) * V; e0 < n; e0 += kUnroll * step) {
    float v[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t e = e0 + u * step;
      if (V > 1 && e + V <= d) {
        load_pack(row + e, v[u]);
      } else {
#pragma unroll
        for (int q = 0; q < V; ++q) v[u][q] = e + q < d ? to_float(row[e + q]) : 1.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int q = 0; q < V; ++q) {
        const int64_t e = e0 + u * step + q;
        if (e < n) hash_into_tile(staged, codes, e, c, lo, width, m * v[u][q]);
      }
    }
  }
}

// V: elements per vector load of a token row (1 when rows are not 16-byte aligned).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    fact_sjlt_kernel(const scalar_t* __restrict__ acts, const scalar_t* __restrict__ grads,
                     const float* __restrict__ token_mask, const int32_t* __restrict__ codes_in,
                     const int32_t* __restrict__ codes_out, int64_t tokens, int64_t d_in,
                     int64_t d_out, bool bias, int c, int64_t k_in, int64_t k_out, int tiles_i,
                     int n_tiles, int64_t tokens_per_split, float scale,
                     float* __restrict__ out) {
  extern __shared__ float smem[];
  float* xs = smem;                  // [kSteps][kTile]
  float* ds = smem + kSteps * kTile;  // [kSteps][kTile]
  const int64_t b = blockIdx.x / n_tiles;
  const int tile = static_cast<int>(blockIdx.x % n_tiles);
  const int64_t i0 = static_cast<int64_t>(tile % tiles_i) * kTile;
  const int64_t o0 = static_cast<int64_t>(tile / tiles_i) * kTile;
  // Buckets of this tile on each side (the last tile may be narrower).
  const int64_t wi = std::min<int64_t>(kTile, k_in - i0);
  const int64_t wo = std::min<int64_t>(kTile, k_out - o0);
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * tokens_per_split;
  const int64_t t_end = std::min(tokens, t_begin + tokens_per_split);
  const scalar_t* xb = acts + b * tokens * d_in;
  const scalar_t* gb = grads + b * tokens * d_out;

  OuterTile tile_acc;
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kSteps) {
    zero_shared(smem, 2 * kSteps * kTile);
    __syncthreads();
    const int steps = static_cast<int>(std::min<int64_t>(kSteps, t_end - t0));
    for (int s = 0; s < steps; ++s) {
      const int64_t t = t0 + s;
      const float m = token_mask ? token_mask[b * tokens + t] : 1.0f;
      hash_row<scalar_t, V>(xs + s * kTile, xb + t * d_in, d_in, bias, m, codes_in, c, i0, wi);
      hash_row<scalar_t, V>(ds + s * kTile, gb + t * d_out, d_out, false, 1.0f, codes_out, c, o0,
                            wo);
    }
    __syncthreads();
    tile_acc.accumulate_staged(xs, ds);
    __syncthreads();
  }

  float* ob = out + b * k_out * k_in;
  const bool sole_writer = gridDim.y == 1;
#pragma unroll
  for (int a = 0; a < kMicro; ++a) {
    const int64_t o = tile_acc.row(a);
    if (o >= wo) continue;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t i = tile_acc.col(j);
      if (i >= wi) continue;
      float* dst = ob + (o0 + o) * k_in + i0 + i;
      const float v = scale * tile_acc.acc[a][j];
      if (sole_writer) {
        *dst = v;
      } else {
        atomicAdd(dst, v);
      }
    }
  }
}

at::Tensor fact_sjlt(const at::Tensor& acts_in, const at::Tensor& grads_in,
                     const at::Tensor& codes_in_t, const at::Tensor& codes_out_t, int64_t k_in,
                     int64_t k_out, const std::optional<at::Tensor>& token_mask, bool bias) {
  check_linear(acts_in, grads_in, token_mask);
  check_codes(codes_in_t, "codes_in", acts_in.size(2) + (bias ? 1 : 0), acts_in);
  check_codes(codes_out_t, "codes_out", grads_in.size(2), acts_in);
  TORCH_CHECK(codes_in_t.size(1) == codes_out_t.size(1),
              "codes_in and codes_out must have the same c, got ", codes_in_t.size(1), " and ",
              codes_out_t.size(1));
  check_k(k_in, codes_in_t, "k_in");
  check_k(k_out, codes_out_t, "k_out");
  const at::cuda::CUDAGuard guard(acts_in.device());
  const LinearInputs in(acts_in, grads_in, token_mask);
  const at::Tensor codes_in = codes_in_t.contiguous();
  const at::Tensor codes_out = codes_out_t.contiguous();
  at::Tensor out = at::zeros({in.batch(), k_out * k_in}, in.acts.options().dtype(at::kFloat));
  if (in.batch() == 0 || in.tokens() == 0) return out;

  const int c = static_cast<int>(codes_in.size(1));
  const float scale = 1.0f / static_cast<float>(c);  // 1 / sqrt(c) from each side's sketch
  GRASS_DISPATCH_FLOATING(in.acts.scalar_type(), "grass_kernels::fact_sjlt (CUDA)", [&] {
    auto go = [&](auto v_tag) {
      auto kernel = fact_sjlt_kernel<scalar_t, decltype(v_tag)::value>;
      allow_smem(kernel, kStagingBytes);
      const TileGrid tg = tile_grid(in.batch(), in.tokens(), k_out, k_in,
                                    resident_blocks(kernel, kStagingBytes), "fact_sjlt");
      kernel<<<tg.grid, kThreads, kStagingBytes, at::cuda::getCurrentCUDAStream()>>>(
          in.acts.data_ptr<scalar_t>(), in.grads.data_ptr<scalar_t>(), in.mask_ptr(),
          codes_in.data_ptr<int32_t>(), codes_out.data_ptr<int32_t>(), in.tokens(),
          in.acts.size(2), in.grads.size(2), bias, c, k_in, k_out, tg.tiles_i, tg.n_tiles,
          tg.tokens_per_split, scale, out.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (rows_aligned(in.acts) && rows_aligned(in.grads)) {
      go(std::integral_constant<int, kVec>{});
    } else {
      go(std::integral_constant<int, 1>{});
    }
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace grass

TORCH_LIBRARY_IMPL(grass_kernels, CUDA, m) {
  m.impl("fact_sjlt", &grass::cuda::fact_sjlt);
}
