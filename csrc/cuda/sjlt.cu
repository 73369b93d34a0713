// CUDA kernels of the flat ops: sjlt, grass (mask + SJLT in one pass) and sjlt_transpose, on
// the params that flat_ops.cpp checked. Semantics: grass_kernels/reference.py.
//
// sjlt / grass: a block owns R rows and a chunk of their columns. Each thread loads its inputs
// (16-byte vector loads when the columns are adjacent and the rows aligned; otherwise one
// element at a time through both strides, so a column-strided x is read in place; a gather
// through `columns` for grass), decodes the SJLT codes once for the R rows, and adds into the
// rows' k-vectors held in shared memory (fast shared atomics, R * k * 4 bytes). At the end the
// block flushes its k-vectors to the output with one global atomic per non-zero bucket, or
// plain stores when it is the only block of its rows. When one k-vector does not fit in shared
// memory the block adds straight into the output with global atomics. Any c >= 1, 64-bit
// offsets, the current stream.
#include <algorithm>

#include "dispatch.h"
#include "kernel_utils.cuh"
#include "params.h"

namespace grass {
namespace cuda {
namespace {

// How a block reads its rows' elements: through FlatParams::columns (grass), one element at a
// time through both strides, or in vector loads of 16 bytes (adjacent, aligned columns).
enum class Load { kGather, kStrided, kVector };
// Where a block adds: straight into the output with global atomics (a k-vector does not fit in
// shared memory), into one row's k-vector in shared memory, or into kMaxRows rows' k-vectors.
enum class Accumulate { kGlobal, kSharedRow, kSharedRows };

// Rows of this many k-vectors share one block when they fit this shared-memory budget.
constexpr int kMaxRows = 4;
constexpr int64_t kRowsSmemBudget = 64 * 1024;

// The compile-time shape of one sjlt_rows_kernel instantiation.
template <typename scalar_t, Load kLoad, Accumulate kAcc>
struct RowsShape {
  static constexpr int R = kAcc == Accumulate::kSharedRows ? kMaxRows : 1;  // rows per block
  static constexpr int V = kLoad == Load::kVector ? 16 / sizeof(scalar_t) : 1;  // elements per step
  static constexpr bool kGather = kLoad == Load::kGather;
  static constexpr bool kShared = kAcc != Accumulate::kGlobal;
};

// Block (x: group of R rows, y: chunk of `chunk` table rows) of out = the SJLT of x's rows.
template <typename scalar_t, Load kLoad, Accumulate kAcc>
__global__ void __launch_bounds__(kThreads) sjlt_rows_kernel(const FlatParams p, int64_t chunk) {
  using Shape = RowsShape<scalar_t, kLoad, kAcc>;
  constexpr int R = Shape::R, V = Shape::V;
  extern __shared__ float smem[];
  const int64_t row_stride = p.x.st, col_stride = p.x.sd, k = p.k;
  const int c = static_cast<int>(p.c);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * R;
  const int rows = static_cast<int>(p.rows - r0 < R ? p.rows - r0 : R);
  const int64_t lo = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t hi = lo + chunk < p.cols ? lo + chunk : p.cols;
  const scalar_t* xr = static_cast<const scalar_t*>(p.x.data) + r0 * row_stride;
  float* target = Shape::kShared ? smem : p.out + r0 * k;  // row r's k-vector starts at r * k

  if (Shape::kShared) {
    zero_shared(smem, static_cast<int64_t>(rows) * k);
    __syncthreads();
  }
  for (int64_t i = lo + static_cast<int64_t>(threadIdx.x) * V; i < hi;
       i += static_cast<int64_t>(blockDim.x) * V) {
    const int n = hi - i < V ? static_cast<int>(hi - i) : V;
    float v[R][V];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (V > 1 && n == V && r < rows) {
        load_pack(xr + r * row_stride + i, v[r]);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          if (r < rows && e < n) {
            const int64_t col = Shape::kGather ? __ldg(p.columns + i + e) : i + e;
            v[r][e] = to_float(xr[r * row_stride + col * col_stride]);
          } else {
            v[r][e] = 0.0f;
          }
        }
      }
    }
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (e >= n) break;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < rows) sjlt_scatter(target + r * k, p.codes, i + e, c, p.scale * v[r][e]);
      }
    }
  }
  if (Shape::kShared) {
    __syncthreads();
    for (int r = 0; r < rows; ++r) {
      flush_kvector(smem + r * k, p.out + (r0 + r) * k, k, gridDim.y == 1);
    }
  }
}

template <typename scalar_t, Load kLoad, Accumulate kAcc>
void launch_rows(const FlatParams& p) {
  using Shape = RowsShape<scalar_t, kLoad, kAcc>;
  auto kernel = sjlt_rows_kernel<scalar_t, kLoad, kAcc>;
  const int64_t smem = Shape::kShared ? Shape::R * p.k * 4 : 0;
  // One wave of resident blocks (the work is uniform, a partial second wave would idle most of
  // the GPU), but chunks long enough that each thread scatters several steps' worth and the
  // per-block flush (k entries per row) stays small beside it.
  const int64_t groups = ceil_div(p.rows, Shape::R);
  const int64_t min_chunk = std::max<int64_t>(static_cast<int64_t>(kThreads) * Shape::V * 4, p.k);
  const int64_t want = launch_capacity(reinterpret_cast<const void*>(kernel), smem) / groups;
  const int64_t chunks =
      std::max<int64_t>(1, std::min({want, ceil_div(p.cols, min_chunk), int64_t{65535}}));
  // A multiple of V, which keeps the vector loads aligned.
  const int64_t chunk = ceil_div(ceil_div(p.cols, chunks), Shape::V) * Shape::V;
  const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(ceil_div(p.cols, chunk)));
  kernel<<<grid, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(p, chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    sjlt_transpose_kernel(const TransposeParams p, int64_t total) {
  const scalar_t* y = static_cast<const scalar_t*>(p.y.data);
  const int c = static_cast<int>(p.c);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = idx / p.d;
    const int32_t* row = p.codes + (idx - n * p.d) * c;
    const scalar_t* yr = y + n * p.k;
    float acc = 0.0f;
    for (int j = 0; j < c; ++j) {
      const int32_t code = __ldg(row + j);
      acc += code_sign(code) * to_float(yr[code_bucket(code)]);
    }
    p.out[idx] = acc * p.scale;
  }
}

}  // namespace
}  // namespace cuda

// out (N, k) fp32 = the SJLT of x's columns (all, or the gathered ones), x read in place
// through both strides.
void run_cuda(const FlatParams& p) {
  using namespace cuda;
  // The blocks add into the output.
  C10_CUDA_CHECK(cudaMemsetAsync(p.out, 0, p.rows * p.k * sizeof(float),
                                 at::cuda::getCurrentCUDAStream()));
  if (p.rows == 0 || p.cols == 0) return;
  const bool shared = p.k * 4 <= max_smem_bytes();
  const bool many_rows = shared && p.rows >= kMaxRows && kMaxRows * p.k * 4 <= kRowsSmemBudget;
  const Accumulate acc =
      !shared ? Accumulate::kGlobal : many_rows ? Accumulate::kSharedRows : Accumulate::kSharedRow;
  GRASS_DISPATCH_FLOATING(p.x.dtype, "grass_kernels flat op (CUDA)", [&] {
    const bool vector =
        p.x.sd == 1 && vector_aligned(p.x.data, p.x.st * static_cast<int64_t>(sizeof(scalar_t)));
    const Load load = p.columns ? Load::kGather : vector ? Load::kVector : Load::kStrided;
    switch_value<Load::kStrided, Load::kGather, Load::kVector>(load, [&](auto load_tag) {
      switch_value<Accumulate::kSharedRow, Accumulate::kGlobal, Accumulate::kSharedRows>(
          acc, [&](auto acc_tag) {
            launch_rows<scalar_t, decltype(load_tag)::value, decltype(acc_tag)::value>(p);
          });
    });
  });
}

void run_cuda(const TransposeParams& p) {
  using namespace cuda;
  const int64_t total = p.rows * p.d;
  if (total == 0) return;
  const int64_t blocks = std::min<int64_t>(ceil_div(total, kThreads), 32LL * sm_count());
  GRASS_DISPATCH_FLOATING(p.y.dtype, "grass_kernels::sjlt_transpose (CUDA)", [&] {
    sjlt_transpose_kernel<scalar_t>
        <<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            p, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace grass
