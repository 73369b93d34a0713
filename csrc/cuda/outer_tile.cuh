// The block-level core of the fused factorized kernels: accumulate a kTile x kTile tile of
// sum_t d_t x_t^T over tokens staged in shared memory, on CUDA cores with fp32 accumulation.
//
// A block of kThreads = 256 threads is a 16 x 16 grid; thread (ty, tx) owns the 8 x 8 outputs
// (ty + 16 a, tx + 16 j). Strided ownership makes the 16 threads of a half-warp read 16
// consecutive floats of a staged row (no bank conflicts) and broadcast the other operand.
//
// Staging layout: xs and ds are [kSteps][kTile] fp32 rows, one per token; a kernel fills them
// (gathering masked columns, each tensor converted from its own dtype), calls
// accumulate_staged, and repeats.
#pragma once

#include <algorithm>
#include <optional>

#include "kernel_utils.cuh"
#include "params.h"

namespace grass {
namespace cuda {

constexpr int kTile = 128;                // reduced rows / columns per block
constexpr int kSteps = 32;                // tokens staged per step
constexpr int kSub = 16;                  // threads per tile side
constexpr int kMicro = kTile / kSub;      // outputs per thread per side
constexpr int64_t kStagingBytes = 2 * kSteps * kTile * sizeof(float);
static_assert(kSub * kSub == kThreads, "the tile grid must use every thread");

struct OuterTile {
  float acc[kMicro][kMicro];
  int tx, ty;

  __device__ __forceinline__ OuterTile() : tx(threadIdx.x % kSub), ty(threadIdx.x / kSub) {
#pragma unroll
    for (int a = 0; a < kMicro; ++a)
#pragma unroll
      for (int j = 0; j < kMicro; ++j) acc[a][j] = 0.0f;
  }

  // acc += ds^T xs over the kSteps staged tokens. Call between two __syncthreads.
  __device__ __forceinline__ void accumulate_staged(const float* xs, const float* ds) {
#pragma unroll 4
    for (int s = 0; s < kSteps; ++s) {
      float dr[kMicro], xr[kMicro];
#pragma unroll
      for (int a = 0; a < kMicro; ++a) dr[a] = ds[s * kTile + ty + a * kSub];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) xr[j] = xs[s * kTile + tx + j * kSub];
#pragma unroll
      for (int a = 0; a < kMicro; ++a)
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc[a][j] = fmaf(dr[a], xr[j], acc[a][j]);
    }
  }

  // Row (d side) and column (x side) of output (a, j) within the tile.
  __device__ __forceinline__ int row(int a) const { return ty + a * kSub; }
  __device__ __forceinline__ int col(int j) const { return tx + j * kSub; }
};

// The launch of a tiled factorized kernel: grid x = (example, kTile x kTile tile of the
// rows x cols output), grid y = token split. Token splits fill one wave of the `resident`
// blocks the GPU holds at once, each block taking whole staging steps of tokens.
struct TileGrid {
  dim3 grid;
  int tiles_i;  // tiles along cols; tile = blockIdx.x % n_tiles, col tile = tile % tiles_i
  int n_tiles;
  int64_t tokens_per_split;
};

inline TileGrid tile_grid(int64_t batch, int64_t tokens, int64_t rows, int64_t cols,
                          int64_t resident, const char* op) {
  const int64_t tiles_i = ceil_div(cols, kTile);
  const int64_t n_tiles = tiles_i * ceil_div(rows, kTile);
  TORCH_CHECK(batch * n_tiles < (int64_t{1} << 31), op, ": B * tiles = ", batch * n_tiles,
              " is too large for one launch");
  const int64_t steps = ceil_div(tokens, kSteps);
  const int64_t want = resident / (batch * n_tiles);
  const int64_t splits = std::max<int64_t>(1, std::min({want, steps, int64_t{65535}}));
  const int64_t per = ceil_div(steps, splits) * kSteps;
  const dim3 grid(static_cast<unsigned>(batch * n_tiles),
                  static_cast<unsigned>(ceil_div(tokens, per)));
  return {grid, static_cast<int>(tiles_i), static_cast<int>(n_tiles), per};
}

// A (B, T, d) tensor read in place, in its own dtype, through its strides (in elements): a
// kernel that gathers a few columns never needs a contiguous copy of the whole tensor.
template <typename scalar_t>
struct Strided3 {
  const scalar_t* __restrict__ data;
  int64_t sb, st, sd;

  __device__ __forceinline__ explicit Strided3(const InputView& v)
      : data(static_cast<const scalar_t*>(v.data)), sb(v.sb), st(v.st), sd(v.sd) {}

  // Element (b, 0, i); token t of that column is at [t * st].
  __device__ __forceinline__ const scalar_t* column(int64_t b, int64_t i) const {
    return data + b * sb + i * sd;
  }
};

}  // namespace cuda
}  // namespace grass
