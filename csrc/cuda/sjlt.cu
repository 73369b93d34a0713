// CUDA kernels of the flat ops: sjlt, grass (mask + SJLT in one pass) and sjlt_transpose.
// Semantics: grass_kernels/reference.py.
//
// sjlt / grass: a block owns R rows and a chunk of their columns. Each thread loads its inputs
// (16-byte vector loads when the columns are adjacent and the rows aligned; otherwise one
// element at a time through both strides, so a column-strided x is read in place; a gather
// through `indices` for grass),
// decodes the SJLT codes once for the R rows, and adds into the rows' k-vectors held in shared
// memory (fast shared atomics, R * k * 4 bytes). At the end the block flushes its k-vectors to
// the output with one global atomic per non-zero bucket, or plain stores when it is the only
// block of its rows. When one k-vector does not fit in shared memory the block adds straight
// into the output with global atomics. Any c >= 1, 64-bit offsets, the current stream.
#include <algorithm>
#include <type_traits>

#include "kernel_utils.cuh"

namespace grass {
namespace cuda {
namespace {

// R rows share each decoded code; V elements per thread step (V > 1: one vector load per row);
// kGather: element i of a row is column columns[i] (grass), else column i; kShared: accumulate
// in shared memory (R * k floats) and flush, else add straight into `out`.
template <typename scalar_t, int R, int V, bool kGather, bool kShared>
__global__ void __launch_bounds__(kThreads)
    sjlt_rows_kernel(const scalar_t* __restrict__ x, int64_t row_stride, int64_t col_stride,
                     int64_t n_rows, int64_t d, const int64_t* __restrict__ columns,
                     const int32_t* __restrict__ codes, int c, int64_t k, int64_t chunk,
                     float scale, float* __restrict__ out) {
  extern __shared__ float smem[];
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * R;
  const int rows = static_cast<int>(n_rows - r0 < R ? n_rows - r0 : R);
  const int64_t lo = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t hi = lo + chunk < d ? lo + chunk : d;
  const scalar_t* xr = x + r0 * row_stride;
  float* target = kShared ? smem : out + r0 * k;  // row r's k-vector starts at r * k

  if (kShared) {
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
            const int64_t col = kGather ? __ldg(columns + i + e) : i + e;
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
        if (r < rows) sjlt_scatter(target + r * k, codes, i + e, c, scale * v[r][e]);
      }
    }
  }
  if (kShared) {
    __syncthreads();
    for (int r = 0; r < rows; ++r) {
      flush_kvector(smem + r * k, out + (r0 + r) * k, k, gridDim.y == 1);
    }
  }
}

// Rows of this many k-vectors share one block when they fit this shared-memory budget.
constexpr int kMaxRows = 4;
constexpr int64_t kRowsSmemBudget = 64 * 1024;

template <typename scalar_t>
struct RowsArgs {
  const scalar_t* x;
  int64_t row_stride, col_stride, n_rows, d;
  const int64_t* columns;  // grass: the selected columns; sjlt: nullptr
  const int32_t* codes;
  int c;
  int64_t k;
  float scale;
  float* out;
};

template <typename scalar_t, int R, int V, bool kGather, bool kShared>
void launch_rows(const RowsArgs<scalar_t>& a) {
  auto kernel = sjlt_rows_kernel<scalar_t, R, V, kGather, kShared>;
  const int64_t smem = kShared ? R * a.k * 4 : 0;
  // One wave of resident blocks (the work is uniform, a partial second wave would idle most of
  // the GPU), but chunks long enough that each thread scatters several steps' worth and the
  // per-block flush (k entries per row) stays small beside it.
  const int64_t groups = ceil_div(a.n_rows, R);
  const int64_t min_chunk = std::max<int64_t>(static_cast<int64_t>(kThreads) * V * 4, a.k);
  const int64_t want = launch_capacity(reinterpret_cast<const void*>(kernel), smem) / groups;
  const int64_t chunks =
      std::max<int64_t>(1, std::min({want, ceil_div(a.d, min_chunk), int64_t{65535}}));
  const int64_t chunk = ceil_div(ceil_div(a.d, chunks), V) * V;  // keeps vector loads aligned
  const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(ceil_div(a.d, chunk)));
  kernel<<<grid, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      a.x, a.row_stride, a.col_stride, a.n_rows, a.d, a.columns, a.codes, a.c, a.k, chunk,
      a.scale, a.out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// y (N, k) fp32 = sum over the d (possibly gathered) columns of x, scaled by `scale`. x is
// read in place through both strides.
at::Tensor sjlt_rows(const at::Tensor& x, const at::Tensor* columns, const at::Tensor& codes,
                     int64_t k, double scale) {
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t n_rows = x.size(0);
  const int64_t d = columns ? columns->numel() : x.size(1);
  const int c = static_cast<int>(codes.size(1));
  at::Tensor out = at::zeros({n_rows, k}, x.options().dtype(at::kFloat));
  if (n_rows == 0 || d == 0) return out;

  const bool shared = k * 4 <= max_smem_bytes();
  const bool many_rows = shared && n_rows >= kMaxRows && kMaxRows * k * 4 <= kRowsSmemBudget;
  const float s = static_cast<float>(scale / std::sqrt(static_cast<double>(c)));
  GRASS_DISPATCH_FLOATING(x.scalar_type(), "grass_kernels::sjlt (CUDA)", [&] {
    const RowsArgs<scalar_t> args{x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), n_rows, d,
                                  columns ? columns->data_ptr<int64_t>() : nullptr,
                                  codes.data_ptr<int32_t>(), c, k, s, out.data_ptr<float>()};
    // One instantiation per (rows per block, vector width, gather, shared) that can occur.
    auto go = [&](auto v_tag, auto gather_tag) {
      constexpr int kV = decltype(v_tag)::value;
      constexpr bool kG = decltype(gather_tag)::value;
      if (!shared) {
        launch_rows<scalar_t, 1, kV, kG, false>(args);
      } else if (many_rows) {
        launch_rows<scalar_t, kMaxRows, kV, kG, true>(args);
      } else {
        launch_rows<scalar_t, 1, kV, kG, true>(args);
      }
    };
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool aligned = x.stride(1) == 1 &&
                         reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                         (x.stride(0) * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0;
    if (columns) {
      go(std::integral_constant<int, 1>{}, std::true_type{});
    } else if (aligned) {
      go(std::integral_constant<int, kVec>{}, std::false_type{});
    } else {
      go(std::integral_constant<int, 1>{}, std::false_type{});
    }
  });
  return out;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    sjlt_transpose_kernel(const scalar_t* __restrict__ y, int64_t k,
                          const int32_t* __restrict__ codes, int c, int64_t d, int64_t total,
                          float scale, float* __restrict__ out) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = idx / d;
    const int32_t* row = codes + (idx - n * d) * c;
    const scalar_t* yr = y + n * k;
    float acc = 0.0f;
    for (int j = 0; j < c; ++j) {
      const int32_t code = __ldg(row + j);
      acc += code_sign(code) * to_float(yr[code_bucket(code)]);
    }
    out[idx] = acc * scale;
  }
}

at::Tensor sjlt(const at::Tensor& x, const at::Tensor& codes, int64_t k) {
  check_float(x, "x", 2);
  check_codes(codes, "codes", x.size(1), x);
  check_k(k, codes);
  const at::Tensor table = codes.contiguous();
  check_ranges({{table, "codes", k, "k", true}});
  return sjlt_rows(x, nullptr, table, k, 1.0);
}

at::Tensor grass(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& codes,
                 int64_t k, double scale) {
  check_float(x, "x", 2);
  check_indices(indices, "indices", x);
  check_codes(codes, "codes", indices.numel(), x);
  check_k(k, codes);
  const at::Tensor idx = indices.contiguous();
  const at::Tensor table = codes.contiguous();
  check_ranges({{table, "codes", k, "k", true}, {idx, "indices", x.size(1), "", false}});
  return sjlt_rows(x, &idx, table, k, scale);
}

at::Tensor sjlt_transpose(const at::Tensor& y_in, const at::Tensor& codes_in) {
  check_float(y_in, "y", 2);
  check_codes(codes_in, "codes", codes_in.size(0), y_in);
  check_k(y_in.size(1), codes_in);
  const at::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous();
  const at::Tensor codes = codes_in.contiguous();
  check_ranges({{codes, "codes", y.size(1), "k", true}});
  const int64_t d = codes.size(0);
  const int c = static_cast<int>(codes.size(1));
  at::Tensor out = at::empty({y.size(0), d}, y.options().dtype(at::kFloat));
  const int64_t total = out.numel();
  if (total == 0) return out;
  const int64_t blocks = std::min<int64_t>(ceil_div(total, kThreads), 32LL * sm_count());
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c)));
  GRASS_DISPATCH_FLOATING(y.scalar_type(), "grass_kernels::sjlt_transpose (CUDA)", [&] {
    sjlt_transpose_kernel<scalar_t>
        <<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            y.data_ptr<scalar_t>(), y.size(1), codes.data_ptr<int32_t>(), c, d, total, scale,
            out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace grass

TORCH_LIBRARY_IMPL(grass_kernels, CUDA, m) {
  m.impl("sjlt", &grass::cuda::sjlt);
  m.impl("sjlt_transpose", &grass::cuda::sjlt_transpose);
  m.impl("grass", &grass::cuda::grass);
}
