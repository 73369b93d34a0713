// CPU (C++/OpenMP) kernels of the flat ops: sjlt, sjlt_transpose, grass, on the params that
// flat_ops.cpp checked. Semantics: grass_kernels/reference.py. Inputs fp32/bf16/fp16 (fp64
// compiles too), fp32 accumulation and output, 64-bit offsets into x everywhere.
//
// Why the kernels look like this (bench/README.md has the measurements behind each choice):
// - SJLT is a scatter-add: one pass over x plus one 4-byte table load per (coordinate, copy).
//   Rows are taken kLanes = 8 at a time and their 8 values of one coordinate form one vector:
//   one table load and decode, and one 32-byte read-modify-write of an accumulator laid out
//   (bucket, lane), serve 8 rows, where row-major (row, bucket) accumulators would need a
//   scalar add per row.
// - The 8-row vectors are built with 8 vector loads and an 8 x 8 register transpose rather
//   than element by element.
// - The table is shared by all rows: when it does not fit in L2, a thread sweeps a tile of
//   kTile coordinates for all its row groups before moving on, so each group reads the tile
//   from L1/L2 instead of the whole table from L3/DRAM (160 MB at D = 1e7, c = 4).
// - Each thread owns whole output rows when the rows split evenly (no reduction; its
//   accumulators, rows * k * 4 bytes, stay in L2); with few rows threads split D instead and
//   their per-thread accumulators are summed at the end.
// - The sign rides in the code's top bit (~b for -1) and is XORed into the float's sign bit;
//   1 / sqrt(c) (and grass's mask scale) is applied once to the k outputs.
// - grass gathers k' masked columns: at D = 1e6, k' = 16384 that is a cache miss per element,
//   and it costs about what index_select's gather costs (mask-then-sjlt pays that gather plus
//   a write and re-read of (N, k')). Software prefetching does not shorten it, so there is
//   none.
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <type_traits>

#include "common.h"
#include "cpu/simd.h"
#include "dispatch.h"
#include "params.h"

namespace grass {
namespace {

// Rows per group: their values for one coordinate form one vector, so one table load, one
// decode and one vector read-modify-write of the accumulator serve kLanes rows. The
// accumulator is laid out (bucket, lane): the kLanes partial sums of a bucket share 32 bytes.
constexpr int kLanes = 8;
using Lanes = simd::Floats<kLanes>;
// Coordinates per tile when the table is too big for L2: the tile's codes (kTile * c * 4
// bytes) are read from L1/L2 by every row group of the thread instead of once per group from
// L3 / DRAM (the table is 160 MB at D = 1e7, c = 4).
constexpr int64_t kTile = 4096;
constexpr int64_t kTableInL2 = 1 << 16;  // codes (256 KB)
// Below this many scatter-adds one thread is faster than waking the pool.
constexpr int64_t kSerialWork = 1 << 15;

// Which column of x feeds table row m: m itself (sjlt, unit inner stride) or a masked column
// (grass, any inner stride: only k' columns are read, so copying x would cost more than it saves).
struct Identity {
  int64_t operator()(int64_t m) const { return m; }
};
struct Gather {
  const int64_t* idx;
  int64_t stride;
  int64_t operator()(int64_t m) const { return idx[m] * stride; }
};

// acc[b_j][:] += s_j v for the c codes of one coordinate (C: see switch_copies).
template <int C>
inline void add_signed(Lanes* __restrict__ acc, Lanes v, const int32_t* code, int64_t c_runtime) {
  for (int64_t j = 0; j < copies<C>(c_runtime); ++j) {
    acc[code_bucket(code[j])] += simd::apply_sign(v, code[j]);
  }
}

// acc[b_j(m)][lane] += s_j(m) x[rows[lane], cols(m)] for m in [lo, hi). A group with fewer than
// kLanes rows repeats its last row; those lanes are never read back.
template <int C, typename scalar_t, typename Cols>
void scatter_group(const scalar_t* const (&rows)[kLanes], Lanes* __restrict__ acc,
                   const int32_t* __restrict__ codes, int64_t c_runtime, int64_t lo, int64_t hi,
                   Cols cols) {
  const auto c = copies<C>(c_runtime);
  int64_t m = lo;
  if constexpr (std::is_same_v<Cols, Identity>) {
    // Adjacent columns: kLanes vector loads and a transpose give kLanes coordinates' lanes,
    // far cheaper than building the lanes element by element.
    for (; m + kLanes <= hi; m += kLanes) {
      Lanes v[kLanes];
      for (int r = 0; r < kLanes; ++r) v[r] = simd::load_floats<kLanes>(rows[r] + m);
      simd::transpose8(v);
      for (int j = 0; j < kLanes; ++j) add_signed<C>(acc, v[j], codes + (m + j) * c, c);
    }
  }
  for (; m < hi; ++m) {
    const int64_t col = cols(m);
    Lanes v;
    for (int r = 0; r < kLanes; ++r) v[r] = static_cast<float>(rows[r][col]);
    add_signed<C>(acc, v, codes + m * c, c);
  }
}

// Rows [r0, r1) of x over table rows [m0, m1) into acc, (groups, k) Lanes, group g holding rows
// r0 + g * kLanes + lane.
template <int C, typename scalar_t, typename Cols>
void scatter_rows(const scalar_t* x, int64_t row_stride, int64_t r0, int64_t r1, Cols cols,
                  const int32_t* codes, int64_t c, int64_t m0, int64_t m1, Lanes* acc,
                  int64_t k) {
  const int64_t tile = m1 - m0 <= kTableInL2 / c ? std::max<int64_t>(m1 - m0, 1) : kTile;
  for (int64_t t0 = m0; t0 < m1; t0 += tile) {
    const int64_t t1 = std::min(m1, t0 + tile);
    for (int64_t g = 0; r0 + g * kLanes < r1; ++g) {
      const scalar_t* rows[kLanes];
      for (int r = 0; r < kLanes; ++r)
        rows[r] = x + std::min(r0 + g * kLanes + r, r1 - 1) * row_stride;
      scatter_group<C>(rows, acc + g * k, codes, c, t0, t1, cols);
    }
  }
}

int threads_for(int64_t work) {
  return work < kSerialWork ? 1 : std::max(1, at::get_num_threads());
}

// Owning whole rows needs no reduction but balances only when rows split evenly (or there are
// many of them); otherwise threads split the table rows and reduce their N * k partial sums.
bool split_rows(int64_t n, int nt) { return n >= nt && (n % nt == 0 || n >= 8 * nt); }

int64_t groups(int64_t rows) { return (rows + kLanes - 1) / kLanes; }

// out[r0 + row] = scale * acc rows: acc (groups, k) Lanes -> (rows, k) row-major.
void write_rows(const Lanes* acc, int64_t rows, int64_t k, float scale, float* out) {
  for (int64_t g = 0; g * kLanes < rows; ++g) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, rows - g * kLanes));
    for (int64_t b = 0; b < k; ++b) {
      const Lanes a = acc[g * k + b];
      for (int lane = 0; lane < lanes; ++lane) out[(g * kLanes + lane) * k + b] = a[lane] * scale;
    }
  }
}

// out.flat[lo:hi] = scale * the sum over parts of the (groups, k) Lanes accumulators.
void reduce_parts(const Lanes* acc, int parts, int64_t part_size, int64_t k, int64_t lo,
                  int64_t hi, float scale, float* out) {
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t row = i / k, at = (row / kLanes) * k + i % k;
    float sum = 0.0f;
    for (int p = 0; p < parts; ++p) sum += acc[p * part_size + at][row % kLanes];
    out[i] = sum * scale;
  }
}

// out (n, k) fp32 = scale * the SJLT of x's rows through cols and codes (m_total, c). Zeroing,
// scatter and write-back happen in one parallel region: each extra fork/join of the pool
// (torch ops between regions) makes every thread wait for the slowest one to arrive.
template <typename scalar_t, typename Cols>
void scatter(const scalar_t* x, int64_t n, int64_t row_stride, int64_t m_total, Cols cols,
             const int32_t* codes, int64_t c, int64_t k, float scale, float* out) {
  const int parts = threads_for(n * m_total * c);
  const bool by_rows = split_rows(n, parts);
  // Part p: its slice of the rows over all of D, or all rows over its slice of D.
  const int64_t part_size = (by_rows ? groups((n + parts - 1) / parts) : groups(n)) * k;
  at::Tensor acc_buf = at::empty({parts, part_size, kLanes}, at::TensorOptions(at::kFloat));
  Lanes* acc = reinterpret_cast<Lanes*>(acc_buf.data_ptr<float>());
  switch_copies(c, [&](auto copies_tag) {
    constexpr int C = decltype(copies_tag)::value;
#pragma omp parallel num_threads(parts)
    {
      const int t = omp_get_thread_num(), used = omp_get_num_threads();
      for (int p = t; p < parts; p += used) {  // fewer threads than parts: take several
        const int64_t r0 = by_rows ? n * p / parts : 0, r1 = by_rows ? n * (p + 1) / parts : n;
        const int64_t m0 = by_rows ? 0 : m_total * p / parts;
        const int64_t m1 = by_rows ? m_total : m_total * (p + 1) / parts;
        Lanes* part = acc + p * part_size;
        std::fill(part, part + groups(r1 - r0) * k, Lanes{});
        scatter_rows<C>(x, row_stride, r0, r1, cols, codes, c, m0, m1, part, k);
        if (by_rows) write_rows(part, r1 - r0, k, scale, out + r0 * k);
      }
      if (!by_rows) {
#pragma omp barrier
        reduce_parts(acc, parts, part_size, k, n * k * t / used, n * k * (t + 1) / used, scale,
                     out);
      }
    }
  });
}

}  // namespace

// sjlt reads adjacent columns (Identity: vector loads and a transpose), so a column-strided x
// is copied once; grass reads only its k' columns (Gather), through any strides.
void run_cpu(const FlatParams& p) {
  at::Tensor dense;  // sjlt's contiguous copy of a column-strided x
  InputView x = p.x;
  if (!p.columns && x.sd != 1) {
    dense = at::from_blob(const_cast<void*>(x.data), {p.rows, p.width}, {x.st, x.sd},
                          at::TensorOptions(x.dtype))
                .contiguous();
    x = {dense.data_ptr(), x.dtype, 0, dense.stride(0), 1};
  }
  GRASS_DISPATCH_FLOATING(x.dtype, "grass_kernels flat op (CPU)", [&] {
    const auto* data = static_cast<const scalar_t*>(x.data);
    if (p.columns) {
      scatter(data, p.rows, x.st, p.cols, Gather{p.columns, x.sd}, p.codes, p.c, p.k, p.scale,
              p.out);
    } else {
      scatter(data, p.rows, x.st, p.cols, Identity{}, p.codes, p.c, p.k, p.scale, p.out);
    }
  });
}

// x[n, i] = sum_j s_j(i) y[n, b_j(i)] / sqrt(c): a gather, so every output is written once and
// threads split (row block, D tile) pairs freely. y (N, k) is converted to fp32 up front: it is
// D / k times smaller than the output, and the gathers then hit one layout.
void run_cpu(const TransposeParams& p) {
  const at::Tensor y = at::from_blob(const_cast<void*>(p.y.data), {p.rows, p.k},
                                     at::TensorOptions(p.y.dtype))
                           .to(at::kFloat);
  const int64_t n = p.rows, k = p.k, d = p.d;
  const float* yp = y.data_ptr<float>();
  const int32_t* cp = p.codes;
  float* op = p.out;
  const float scale = p.scale;  // a local: stores through op could alias p's members
  const int64_t row_blocks = (n + kLanes - 1) / kLanes, tiles = (d + kTile - 1) / kTile;
  const int nt = threads_for(n * d * p.c);
  switch_copies(p.c, [&](auto copies_tag) {
    constexpr int C = decltype(copies_tag)::value;
    const auto cc = copies<C>(p.c);
#pragma omp parallel for collapse(2) schedule(static) num_threads(nt)
    for (int64_t rb = 0; rb < row_blocks; ++rb) {
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t i1 = std::min(d, (tile + 1) * kTile);
        for (int64_t r = rb * kLanes; r < std::min(n, (rb + 1) * kLanes); ++r) {
          const float* yr = yp + r * k;
          float* orow = op + r * d;
          for (int64_t i = tile * kTile; i < i1; ++i) {
            float acc = 0.0f;
            for (int64_t j = 0; j < cc; ++j)
              acc += simd::apply_sign(yr[code_bucket(cp[i * cc + j])], cp[i * cc + j]);
            orow[i] = acc * scale;
          }
        }
      }
    }
  });
}

}  // namespace grass
