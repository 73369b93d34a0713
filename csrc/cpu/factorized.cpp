// CPU (C++/OpenMP) kernels of the factorized ops: logra, fact_grass, fact_sjlt, on the params
// that factorized_ops.cpp checked. Semantics: grass_kernels/reference.py. acts (B, T, d_in) and
// grads (B, T, d_out) in fp32, bf16 or fp16 with any strides; fp32 accumulation and output.
//
// All three ops have one shape: per example b, per tile of token rows, fill two fp32 tiles
//     U (tokens x n_out) from grads,   V (tokens x n_in) from acts (token mask and bias folded in)
// and accumulate A += U^T V (n_out x n_in) in a per-thread buffer; at the end of the example
// A is written out (logra, fact_sjlt) or scaled and scattered into the SJLT buckets
// (fact_grass). What differs is how U and V are filled and multiplied:
//     fact_grass  gather the k_o' / k_i' masked columns (index d_in of acts = virtual 1.0)
//                 straight into the panel layout of our own register-blocked outer-product
//                 kernel (outer_panels): row by row where the columns are dense in a row,
//                 column by column down the tile where they are sparse (sparse_columns)
//     logra       project the rows: X P_in^T, Delta P_out^T (bias: + P_in[:, d_in])
//     fact_sjlt   hash-scatter the rows into k_in / k_out buckets, 16 tokens at a time as one
//                 AVX-512 vector per bucket (the tiles are then token-minor)
// Nothing proportional to B*T*k or B*d_out*d_in is ever allocated: the workspace is
// threads x (tile rows x (n_in + n_out + one converted input row) + n_out x n_in) floats.
//
// The dense products of logra and fact_sjlt (A += U^T V and logra's projections) go to ATen's
// addmm / mm on from_blob views of the per-thread buffers, i.e. MKL's sgemm, called from inside
// our parallel region, where it runs single-threaded. fact_grass's product, k_o' x k_i' x
// tokens per example (128 x 128 x 256 for a 128 x 128 mask and 256-token tiles), is most of
// its time; there MKL packs both operands again and pays its call overhead per tile, while the
// panel kernel, fed by the gather in its own layout, skips both.
// Parallelism: examples are split over threads; with fewer examples than threads each
// example's tokens are split into chunks whose results are summed at the end (both the
// copy-out and the SJLT scatter are linear, so partial results add).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/simd.h"
#include "dispatch.h"
#include "params.h"

namespace grass {
namespace {

// Floats per tile (U, V and converted input rows) per thread: ~1 MB, a per-core L2.
constexpr int64_t kTileFloats = 1 << 18;
constexpr int64_t kMaxTileRows = 512;
// fact_grass's outer-product kernel: one call updates a kMR x kNR block of A held in registers
// (16 AVX-512 accumulators); U is packed in panels of kMR columns, V in panels of kNR columns,
// each panel stored token by token (rows x kMR, rows x kNR floats).
constexpr int64_t kMR = 8;
constexpr int64_t kNR = 32;
// fact_grass's column-by-column gather walks down this many tokens at a time: a walk down a
// whole tile (256 tokens, each row 16-57 KB at the Llama widths) touches a page per token and
// misses the TLB; 16-token walks keep their pages and lines at hand for the next columns.
constexpr int64_t kGatherRows = 16;
// fact_sjlt sketches this many tokens at once, as one fp32 vector per bucket (AVX-512 width);
// without AVX-512 (or for strided rows) it transposes kBlock coordinates of them at a time
// into an L1 buffer (kBlock x kLanes floats).
constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 64;
// The AVX-512 sketch reads its 16 rows as 16 streams, more than the hardware prefetcher keeps
// ahead of; it asks for each row's line this many bytes ahead, with the T2 hint (into L2: the
// rows are read once, so they should not displace the accumulators in L1).
constexpr int64_t kSketchPrefetch = 1024;

// One (B, T, d) input, read row by row into fp32, whatever its dtype and strides.
struct Rows {
  const char* data;
  at::ScalarType dtype;
  int64_t itemsize, sb, st, sd;  // strides in elements

  explicit Rows(const InputView& v)
      : data(static_cast<const char*>(v.data)),
        dtype(v.dtype),
        itemsize(static_cast<int64_t>(c10::elementSize(v.dtype))),
        sb(v.sb),
        st(v.st),
        sd(v.sd) {}

  const char* row(int64_t b, int64_t t) const { return data + (b * sb + t * st) * itemsize; }
};

// Row (b, t) gathered into panels of `width` floats spaced `gap` floats apart (the layout of
// outer_panels): column j goes to dst[panel_offset(j, width, gap)], as m * x[off[j]], off in
// elements. Each panel is one contiguous run of stores; the virtual bias column is patched in
// by the caller.
void gather_row(const Rows& in, int64_t b, int64_t t, const int64_t* __restrict off, int64_t n,
                int64_t width, int64_t gap, float m, float* __restrict dst) {
  GRASS_DISPATCH_FLOATING(in.dtype, "gather_row", [&] {
    const auto* __restrict x = reinterpret_cast<const scalar_t*>(in.row(b, t));
    for (int64_t j0 = 0; j0 < n; j0 += width, dst += gap) {
      const int64_t w = std::min(width, n - j0);
      for (int64_t q = 0; q < w; ++q) dst[q] = m * static_cast<float>(x[off[j0 + q]]);
    }
  });
}

// Where column j of a token lands in panels of `width` floats spaced `gap` floats apart,
// relative to the token's first float.
inline int64_t panel_offset(int64_t j, int64_t width, int64_t gap) {
  return j / width * gap + j % width;
}

// Tokens t0 .. t0 + rows - 1 of example b gathered column by column (kGatherRows tokens at a
// time) into the panel layout:
// dst[r * row_gap + panel_offset(j, width, gap)] = x[token t0 + r][off[j]]. No token mask: the
// caller scales (or zeroes) the rows afterwards.
void gather_tile(const Rows& in, int64_t b, int64_t t0, int64_t rows, const int64_t* __restrict off,
                 int64_t n, int64_t width, int64_t gap, int64_t row_gap, float* __restrict dst) {
  GRASS_DISPATCH_FLOATING(in.dtype, "gather_tile", [&] {
    const auto* __restrict x = reinterpret_cast<const scalar_t*>(in.row(b, t0));
    const int64_t st = in.st;
    for (int64_t r0 = 0; r0 < rows; r0 += kGatherRows) {
      const int64_t r1 = std::min(rows, r0 + kGatherRows);
      for (int64_t j = 0; j < n; ++j) {
        const scalar_t* __restrict col = x + off[j];
        float* __restrict d = dst + panel_offset(j, width, gap);
        for (int64_t r = r0; r < r1; ++r) d[r * row_gap] = static_cast<float>(col[r * st]);
      }
    }
  });
}

// Whether gathering the columns `off` (in elements) of a row touches under half of the row's
// cache lines. Such a sparse gather read row by row is latency-bound (one miss per column,
// nothing for the hardware prefetcher to follow); read column by column down a tile of rows
// (gather_tile) it is a set of constant-stride streams, which the prefetcher does follow;
// dense rows are faster read row by row.
bool sparse_columns(const Rows& in, const int64_t* off, int64_t n, int64_t d) {
  std::vector<int64_t> lines(n);
  for (int64_t j = 0; j < n; ++j) lines[j] = off[j] * in.itemsize / 64;
  std::sort(lines.begin(), lines.end());
  const int64_t touched = std::unique(lines.begin(), lines.end()) - lines.begin();
  return touched * 128 < d * in.sd * in.itemsize;
}

// dst[i] = x[i] for the n = d features of row (b, t); a unit stride gets a vectorisable loop.
void load_row(const Rows& in, int64_t b, int64_t t, int64_t n, float* dst) {
  GRASS_DISPATCH_FLOATING(in.dtype, "load_row", [&] {
    const auto* x = reinterpret_cast<const scalar_t*>(in.row(b, t));
    if (in.sd == 1) {
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(x[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(x[i * in.sd]);
    }
  });
}

// SJLT codes decoded once per call: bucket and signed weight (+-1/sqrt(c)) per (row, copy).
struct Sketch {
  at::Tensor buckets, weights;  // int32 / fp32 (rows, c)
  const int32_t* bucket = nullptr;
  const float* weight = nullptr;
  int64_t c;

  // codes (rows, c), checked; scale: folded into the weights (fact_grass's mask rescaling).
  Sketch(const int32_t* codes, int64_t rows, int64_t copies, float scale = 1.0f) : c(copies) {
    buckets = at::empty({rows, c}, at::TensorOptions(at::kInt));
    weights = at::empty({rows, c}, at::TensorOptions(at::kFloat));
    int32_t* bk = buckets.data_ptr<int32_t>();
    float* wt = weights.data_ptr<float>();
    decode(codes, rows * c, scale / std::sqrt(static_cast<float>(c)), bk, wt);
    bucket = bk;
    weight = wt;
  }

  // bk[e], wt[e] = bucket and sign * w of code[e] for e < n. A function of its own with
  // restrict pointers, so the loop vectorises: it runs on every call (16384 codes for a
  // 128 x 128 mask), a fixed cost that weighs most on small calls.
  static void decode(const int32_t* __restrict code, int64_t n, float w, int32_t* __restrict bk,
                     float* __restrict wt) {
    for (int64_t e = 0; e < n; ++e) {
      bk[e] = code_bucket(code[e]);
      wt[e] = code_sign(code[e]) * w;
    }
  }

  // dst[h(e)] += s(e) / sqrt(c) * v[e - e0] for rows e0 .. e0 + n - 1 (C: see switch_copies).
  template <int C>
  void add_rows(int64_t e0, int64_t n, const float* __restrict v, float* __restrict dst) const {
    const auto cc = copies<C>(c);
    const int32_t* __restrict bk = bucket + e0 * cc;
    const float* __restrict wt = weight + e0 * cc;
    for (int64_t e = 0; e < n; ++e) {
      for (int64_t j = e * cc; j < (e + 1) * cc; ++j) dst[bk[j]] += wt[j] * v[e];
    }
  }
};

// Adds the kLanes-token vectors of coordinates i0 .. i0 + width - 1, xt[q * kLanes + lane],
// into their buckets: vt[h * ld + lane] += s / sqrt(c) * xt[...], c copies per coordinate.
void scatter_block(const float* xt, int64_t i0, int64_t width, const Sketch& sk, float* vt,
                   int64_t ld) {
  for (int64_t q = 0; q < width; ++q) {
    const float* col = xt + q * kLanes;
    for (int64_t e = (i0 + q) * sk.c; e < (i0 + q + 1) * sk.c; ++e) {
      float* __restrict dst = vt + sk.bucket[e] * ld;
      const float w = sk.weight[e];
#pragma GCC ivdep
      for (int64_t r = 0; r < kLanes; ++r) dst[r] += w * col[r];
    }
  }
}

#if defined(__AVX512F__)
// The vector path of sketch_tokens for unit-stride fp32/fp16/bf16 rows: 16 coordinates of the
// 16 rows per step, transposed in registers, then one multiply-add per (coordinate, copy) with
// the columns still in registers (C: see switch_copies); returns how many coordinates it
// covered.
template <int C, typename scalar_t>
int64_t sketch_tokens_avx512(const scalar_t* const* x, const float* m, int64_t n,
                             const Sketch& sk, float* vt, int64_t ld) {
  const int64_t covered = n / kLanes * kLanes;
  const int32_t* __restrict bucket = sk.bucket;
  const float* __restrict weight = sk.weight;
  const auto c = copies<C>(sk.c);
  for (int64_t i0 = 0; i0 < covered; i0 += kLanes) {
    __m512 v[16];
    for (int r = 0; r < 16; ++r) {
      if (x[r]) _mm_prefetch(reinterpret_cast<const char*>(x[r] + i0) + kSketchPrefetch, _MM_HINT_T2);
    }
    for (int r = 0; r < 16; ++r) {
      v[r] = x[r] ? _mm512_mul_ps(simd::load_floats<16>(x[r] + i0), _mm512_set1_ps(m[r]))
                  : _mm512_setzero_ps();
    }
    simd::transpose16(v);
    for (int q = 0; q < 16; ++q) {
      for (int64_t e = (i0 + q) * c; e < (i0 + q + 1) * c; ++e) {
        float* dst = vt + bucket[e] * ld;
        _mm512_storeu_ps(dst, _mm512_fmadd_ps(_mm512_set1_ps(weight[e]), v[q],
                                              _mm512_loadu_ps(dst)));
      }
    }
  }
  return covered;
}
#endif

// Sketches token rows t0 .. t0 + lanes - 1 (lanes <= kLanes) of example b, row r scaled by
// m[r]: vt[h * ld + r] = sum_i s(i) / sqrt(c) * m[r] * x_r[i] over coordinates i with bucket h,
// plus the virtual bias input (value m[r]) when bias. vt holds k rows of kLanes floats (row
// stride ld) and is zeroed here. A scatter per element would cost a dependent load and store
// each; transposing the kLanes rows, a block of coordinates at a time, turns it into one
// kLanes-wide multiply-add per (coordinate, copy), vectorised over tokens.
void sketch_tokens(const Rows& in, int64_t b, int64_t t0, int64_t lanes, int64_t n, bool bias,
                   const float* m, const Sketch& sk, int64_t k, float* vt, int64_t ld) {
  for (int64_t h = 0; h < k; ++h) std::fill(vt + h * ld, vt + h * ld + kLanes, 0.0f);
  alignas(64) float xt[kBlock * kLanes];
  GRASS_DISPATCH_FLOATING(in.dtype, "sketch_tokens", [&] {
    const scalar_t* x[kLanes];  // nullptr: a padding lane or a masked token, read as zeros
    for (int64_t r = 0; r < kLanes; ++r) {
      x[r] = r < lanes && m[r] != 0.0f
                 ? reinterpret_cast<const scalar_t*>(in.row(b, t0 + r))
                 : nullptr;
    }
    int64_t start = 0;
#if defined(__AVX512F__)
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (in.sd == 1) {
        // Only c = 1 gets its own loop here: unrolled copy loops for c > 1 run slower than the
        // loop that reads c at run time.
        switch_value<kRuntimeCopies, 1>(sk.c, [&](auto copies_tag) {
          constexpr int C = decltype(copies_tag)::value;
          start = sketch_tokens_avx512<C, scalar_t>(x, m, n, sk, vt, ld);
        });
      }
    }
#endif
    for (int64_t i0 = start; i0 < n; i0 += kBlock) {
      const int64_t width = std::min(kBlock, n - i0);
      for (int64_t r = 0; r < kLanes; ++r) {
        for (int64_t q = 0; q < width; ++q) {
          xt[q * kLanes + r] = x[r] ? m[r] * static_cast<float>(x[r][(i0 + q) * in.sd]) : 0.0f;
        }
      }
      scatter_block(xt, i0, width, sk, vt, ld);
    }
  });
  if (!bias) return;
  for (int64_t e = n * sk.c; e < (n + 1) * sk.c; ++e) {
    float* dst = vt + sk.bucket[e] * ld;
    for (int64_t r = 0; r < kLanes; ++r) dst[r] += sk.weight[e] * m[r];
  }
}

// A (n_out x n_in) += U^T V over `rows` tokens, fp32. The tiles U (tokens x n_out) and
// V (tokens x n_in) are row-major when ld == 0, else token-minor: (token r, feature j) at
// j * ld + r.
void accumulate_outer(int64_t rows, int64_t n_out, int64_t n_in, float* u, float* v, float* a,
                      int64_t ld) {
  auto opts = at::TensorOptions().dtype(at::kFloat);
  auto tile = [&](float* p, int64_t n) {
    return ld ? at::from_blob(p, {rows, n}, {1, ld}, opts) : at::from_blob(p, {rows, n}, opts);
  };
  auto A = at::from_blob(a, {n_out, n_in}, opts);
  A.addmm_(tile(u, n_out).t(), tile(v, n_in));
}

// A (kMR x kNR block, row stride lda) += sum over `rows` tokens of u_t v_t^T, where u_t is token
// t's kMR floats in a U panel and v_t its kNR floats in a V panel. The block stays in registers
// for the whole token loop: per token, two vector loads of v_t and kMR broadcasts of u_t feed
// 2 * kMR independent fused multiply-adds.
#if defined(__AVX512F__)
static_assert(kNR == 32, "the AVX-512 block holds a row of A in two 16-float vectors");
void outer_block(int64_t rows, const float* __restrict u, const float* __restrict v, float* a,
                 int64_t lda) {
  __m512 lo[kMR], hi[kMR];
  for (int r = 0; r < kMR; ++r) {
    lo[r] = _mm512_loadu_ps(a + r * lda);
    hi[r] = _mm512_loadu_ps(a + r * lda + 16);
  }
  for (int64_t t = 0; t < rows; ++t) {
    const __m512 v0 = _mm512_loadu_ps(v + t * kNR), v1 = _mm512_loadu_ps(v + t * kNR + 16);
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) {
      const __m512 ur = _mm512_set1_ps(u[t * kMR + r]);
      lo[r] = _mm512_fmadd_ps(ur, v0, lo[r]);
      hi[r] = _mm512_fmadd_ps(ur, v1, hi[r]);
    }
  }
  for (int r = 0; r < kMR; ++r) {
    _mm512_storeu_ps(a + r * lda, lo[r]);
    _mm512_storeu_ps(a + r * lda + 16, hi[r]);
  }
}
#else
// Portable: the same block in a local array, which the compiler vectorises and keeps in
// registers where the target has enough of them.
void outer_block(int64_t rows, const float* __restrict u, const float* __restrict v, float* a,
                 int64_t lda) {
  float acc[kMR][kNR];
  for (int r = 0; r < kMR; ++r) std::copy(a + r * lda, a + r * lda + kNR, acc[r]);
  for (int64_t t = 0; t < rows; ++t) {
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) {
      const float ur = u[t * kMR + r];
      for (int j = 0; j < kNR; ++j) acc[r][j] += ur * v[t * kNR + j];
    }
  }
  for (int r = 0; r < kMR; ++r) std::copy(acc[r], acc[r] + kNR, a + r * lda);
}
#endif

// A (n_out x n_in, both multiples of the panel widths) += U^T V over `rows` tokens, with U and V
// in panels of `ld` token rows: U panel p holds columns [p kMR, (p + 1) kMR) at up + p ld kMR.
// The U panel (rows x kMR) stays in L1 while the V panels stream from L2.
void outer_panels(int64_t rows, int64_t ld, const float* up, const float* vp, int64_t n_out,
                  int64_t n_in, float* a) {
  for (int64_t ob = 0; ob < n_out / kMR; ++ob) {
    for (int64_t ib = 0; ib < n_in / kNR; ++ib) {
      outer_block(rows, up + ob * ld * kMR, vp + ib * ld * kNR, a + ob * kMR * n_in + ib * kNR,
                  n_in);
    }
  }
}

// Y (rows x k) = X P^T: X (rows x d) with row stride ldx, P (k x d) with row stride ldp.
void project(int64_t rows, int64_t d, int64_t k, const float* x, int64_t ldx, const float* p,
             int64_t ldp, float* y) {
  auto opts = at::TensorOptions().dtype(at::kFloat);
  auto X = at::from_blob(const_cast<float*>(x), {rows, d}, {ldx, 1}, opts);
  auto P = at::from_blob(const_cast<float*>(p), {k, d}, {ldp, 1}, opts);
  auto Y = at::from_blob(y, {rows, k}, opts);
  at::mm_out(Y, X, P.t());
}

// The token mask as a (B, T) fp32 pointer, or nullptr for "all ones".
struct TokenMask {
  const float* ptr;
  int64_t T;

  explicit TokenMask(const LinearParams& p) : ptr(p.token_mask), T(p.tokens) {}
  float operator()(int64_t b, int64_t t) const { return ptr ? ptr[b * T + t] : 1.0f; }
};

// How an op's tokens are cut into work for `threads` threads: `chunks` chunks of `chunk_rows` tokens per
// example (more than one only when there are fewer examples than threads), processed `tile`
// tokens at a time in tiles with room for `stride` tokens.
struct Tiling {
  int64_t n_out, n_in, scratch_floats, threads, chunks, chunk_rows, tile, stride;

  // n_out, n_in: widths of the U and V tiles (and A is n_out x n_in); scratch_floats: per-row
  // scratch the fill needs (e.g. one converted input row); token_minor: the fill writes
  // token-minor tiles (see accumulate_outer) in whole groups of kLanes tokens, so the tile
  // length is a multiple of kLanes.
  Tiling(const LinearParams& p, int64_t n_out_, int64_t n_in_, int64_t scratch, bool token_minor)
      : n_out(n_out_), n_in(n_in_), scratch_floats(scratch) {
    const int64_t B = p.batch, T = p.tokens;
    threads = std::max<int64_t>(1, at::get_num_threads());
    chunks = B >= threads ? 1 : std::min<int64_t>(T, (threads + B - 1) / B);
    chunk_rows = (T + chunks - 1) / chunks;
    tile = std::min({std::max<int64_t>(1, kTileFloats / per_row()), kMaxTileRows, chunk_rows});
    // Token-minor tiles: feature rows of `stride` floats, room for `tile` tokens. The fill
    // updates one kLanes-float line in each of k rows per token group; a stride of an odd
    // number of cache lines spreads those lines over all L1 sets (a power of two, e.g. 256
    // tokens = 1 KB, would pile them into a few sets and evict them constantly).
    stride = tile;
    if (token_minor) {
      tile = (tile + kLanes - 1) / kLanes * kLanes;
      stride = tile / kLanes % 2 ? tile : tile + kLanes;
    }
  }
  int64_t per_row() const { return n_in + n_out + scratch_floats; }
};

// The shared driver. tile_fn(b, t0, rows, U, V, scratch, A) fills the tiles for tokens
// [t0, t0 + rows) of example b and adds their product into A (n_out x n_in); the tiles have
// room for plan.stride tokens. finish(A, dst) adds example (chunk) results into dst (width),
// which starts zeroed; the (B, width) results go to p.out.
template <class Tile, class Finish>
void factorized_driver(const LinearParams& p, const Tiling& plan, int64_t width,
                       const Tile& tile_fn, const Finish& finish) {
  const int64_t B = p.batch, T = p.tokens;
  const int64_t chunks = plan.chunks, stride = plan.stride, n_acc = plan.n_out * plan.n_in;
  const int64_t per_thread = stride * plan.per_row() + n_acc;
  const auto fopts = at::TensorOptions(at::kFloat);
  // Workspace from ATen's allocator, so memory profilers see it like any other allocation.
  auto workspace = at::empty({plan.threads, per_thread}, fopts);
  // Token chunks of one example add up at the end: (B, chunks, width) partial results.
  auto partial = chunks == 1 ? at::Tensor() : at::zeros({B, chunks, width}, fopts);
  float* ws = workspace.data_ptr<float>();
  float* out_ptr = chunks == 1 ? p.out : partial.data_ptr<float>();

  at::parallel_for(0, B * chunks, 1, [&](int64_t lo, int64_t hi) {
    float* u = ws + at::get_thread_num() * per_thread;
    float* v = u + stride * plan.n_out;
    float* scratch = v + stride * plan.n_in;
    float* acc = scratch + stride * plan.scratch_floats;
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / chunks, chunk = item % chunks;
      const int64_t t_end = std::min(T, (chunk + 1) * plan.chunk_rows);
      std::fill(acc, acc + n_acc, 0.0f);
      for (int64_t t0 = chunk * plan.chunk_rows; t0 < t_end; t0 += plan.tile) {
        tile_fn(b, t0, std::min(plan.tile, t_end - t0), u, v, scratch, acc);
      }
      finish(acc, out_ptr + item * width);
    }
  });
  if (chunks > 1) {
    at::Tensor out = at::from_blob(p.out, {B, width}, fopts);
    at::sum_out(out, partial, 1);
  }
}

void copy_out(const float* acc, int64_t n, float* dst) { std::copy(acc, acc + n, dst); }

// Element offsets idx * stride of the n masked columns (idx already checked against [0, d] or
// [0, d)). The virtual bias column (index d) gets offset 0 and its position in bias_pos (else
// -1), so gathers stay branch-free and the caller overwrites that one entry.
std::vector<int64_t> column_offsets(const int64_t* idx, int64_t n, int64_t d, int64_t stride,
                                    int64_t& bias_pos) {
  std::vector<int64_t> off(n);
  bias_pos = -1;
  for (int64_t j = 0; j < n; ++j) {
    if (idx[j] == d) bias_pos = j;
    off[j] = idx[j] < d ? idx[j] * stride : 0;
  }
  return off;
}

}  // namespace

void run_cpu(const FactGrassParams& p) {
  const int64_t d_in = p.d_in, d_out = p.d_out;
  const int64_t n_in = p.k_in_masked, n_out = p.k_out_masked;
  const Rows x(p.acts), g(p.grads);
  int64_t bias_pos, no_bias;
  const auto off_in = column_offsets(p.in_indices, n_in, d_in, x.sd, bias_pos);
  const auto off_out = column_offsets(p.out_indices, n_out, d_out, g.sd, no_bias);
  const int64_t* oi = off_in.data();
  const int64_t* oo = off_out.data();
  const Sketch sk(p.codes, n_out * n_in, p.c, static_cast<float>(p.scale));
  const TokenMask mask(p);

  // U and V in the panel layout of outer_panels, widths rounded up to whole panels. The pad
  // lanes only ever meet A's pad rows / columns, which finish never reads; they are zeroed
  // (a few floats per token) so they never carry stale non-finite values into A.
  const int64_t n_out_pad = (n_out + kMR - 1) / kMR * kMR;
  const int64_t n_in_pad = (n_in + kNR - 1) / kNR * kNR;
  const Tiling plan(p, n_out_pad, n_in_pad, 0, false);
  const int64_t gap_out = plan.stride * kMR, gap_in = plan.stride * kNR;
  auto zero = [](int64_t begin, int64_t end, int64_t width, int64_t gap, float* dst) {
    for (int64_t j = begin; j < end; ++j) dst[panel_offset(j, width, gap)] = 0.0f;
  };
  const bool col_x = sparse_columns(x, oi, n_in, d_in), col_g = sparse_columns(g, oo, n_out, d_out);
  auto tile = [&](int64_t b, int64_t t0, int64_t rows, float* u, float* v, float*, float* acc) {
    if (col_g) gather_tile(g, b, t0, rows, oo, n_out, kMR, gap_out, kMR, u);
    if (col_x) gather_tile(x, b, t0, rows, oi, n_in, kNR, gap_in, kNR, v);
    for (int64_t r = 0; r < rows; ++r) {
      const float m = mask(b, t0 + r);
      float* ur = u + r * kMR;
      float* vr = v + r * kNR;
      if (!col_g) gather_row(g, b, t0 + r, oo, n_out, kMR, gap_out, 1.0f, ur);
      if (m == 0.0f) {
        zero(0, n_in, kNR, gap_in, vr);  // padding: never use what a masked token holds
      } else if (!col_x) {
        gather_row(x, b, t0 + r, oi, n_in, kNR, gap_in, m, vr);
      } else if (m != 1.0f) {
        for (int64_t j = 0; j < n_in; ++j) vr[panel_offset(j, kNR, gap_in)] *= m;
      }
      if (bias_pos >= 0) vr[panel_offset(bias_pos, kNR, gap_in)] = m;
      zero(n_out, n_out_pad, kMR, gap_out, ur);
      zero(n_in, n_in_pad, kNR, gap_in, vr);
    }
    outer_panels(rows, plan.stride, u, v, n_out_pad, n_in_pad, acc);
  };
  auto finish = [&](const float* acc, float* dst) {
    switch_value<kRuntimeCopies, 1>(sk.c, [&](auto copies_tag) {  // c = 1: no copy loop
      constexpr int C = decltype(copies_tag)::value;
      for (int64_t o = 0; o < n_out; ++o) {
        sk.add_rows<C>(o * n_in, n_in, acc + o * n_in_pad, dst);
      }
    });
  };
  factorized_driver(p, plan, p.k, tile, finish);
}

void run_cpu(const LograParams& p) {
  const int64_t d_in = p.d_in, d_out = p.d_out, k_in = p.k_in, k_out = p.k_out;
  const bool bias = p.bias;
  // The bias column of P_in as a contiguous k_in vector (bias adds m_t * p_bias to x_t P_in^T).
  std::vector<float> p_bias(bias ? k_in : 0);
  for (int64_t j = 0; j < static_cast<int64_t>(p_bias.size()); ++j) {
    p_bias[j] = p.p_in[j * (d_in + 1) + d_in];
  }
  const float* pb = bias ? p_bias.data() : nullptr;
  const float* pin = p.p_in;
  const float* pout = p.p_out;
  const Rows x(p.acts), g(p.grads);
  const TokenMask mask(p);
  // fp32 rows with a unit stride feed the GEMM in place; anything else is converted per tile.
  const bool direct_x = x.dtype == at::kFloat && x.sd == 1;
  const bool direct_g = g.dtype == at::kFloat && g.sd == 1;
  const int64_t scratch = std::max(direct_x ? 0 : d_in, direct_g ? 0 : d_out);

  // Y (rows x k) = (rows of `in`) P^T, reading the rows in place when possible.
  auto project_rows = [&](const Rows& in, bool direct, int64_t d, int64_t b, int64_t t0,
                          int64_t rows, const float* proj, int64_t ldp, int64_t k, float* y,
                          float* buf) {
    if (direct) {
      project(rows, d, k, reinterpret_cast<const float*>(in.row(b, t0)), in.st, proj, ldp, y);
      return;
    }
    for (int64_t r = 0; r < rows; ++r) load_row(in, b, t0 + r, d, buf + r * d);
    project(rows, d, k, buf, d, proj, ldp, y);
  };
  auto tile = [&](int64_t b, int64_t t0, int64_t rows, float* u, float* v, float* buf,
                  float* acc) {
    project_rows(x, direct_x, d_in, b, t0, rows, pin, d_in + bias, k_in, v, buf);
    if (pb || mask.ptr) {
      for (int64_t r = 0; r < rows; ++r) {
        const float m = mask(b, t0 + r);
        float* row = v + r * k_in;
        for (int64_t j = 0; j < k_in; ++j) row[j] = m * (row[j] + (pb ? pb[j] : 0.0f));
      }
    }
    project_rows(g, direct_g, d_out, b, t0, rows, pout, d_out, k_out, u, buf);
    accumulate_outer(rows, k_out, k_in, u, v, acc, 0);
  };
  auto finish = [&](const float* acc, float* dst) { copy_out(acc, k_out * k_in, dst); };
  factorized_driver(p, Tiling(p, k_out, k_in, scratch, false), k_out * k_in, tile, finish);
}

void run_cpu(const FactSjltParams& p) {
  const int64_t d_in = p.d_in, d_out = p.d_out, k_in = p.k_in, k_out = p.k_out;
  const bool bias = p.bias;
  const Sketch sk_in(p.codes_in, d_in + bias, p.c_in);
  const Sketch sk_out(p.codes_out, d_out, p.c_out);
  const Rows x(p.acts), g(p.grads);
  const TokenMask mask(p);

  // Token-minor tiles: feature rows of ld floats, tokens in groups of kLanes.
  const Tiling plan(p, k_out, k_in, 0, true);
  const int64_t ld = plan.stride;
  auto tile = [&](int64_t b, int64_t t0, int64_t rows, float* u, float* v, float*, float* acc) {
    for (int64_t r0 = 0; r0 < rows; r0 += kLanes) {
      const int64_t lanes = std::min(kLanes, rows - r0);
      float m[kLanes], ones[kLanes];
      for (int64_t r = 0; r < kLanes; ++r) {
        m[r] = r < lanes ? mask(b, t0 + r0 + r) : 0.0f;
        ones[r] = r < lanes ? 1.0f : 0.0f;
      }
      sketch_tokens(x, b, t0 + r0, lanes, d_in, bias, m, sk_in, k_in, v + r0, ld);
      sketch_tokens(g, b, t0 + r0, lanes, d_out, false, ones, sk_out, k_out, u + r0, ld);
    }
    accumulate_outer(rows, k_out, k_in, u, v, acc, ld);
  };
  auto finish = [&](const float* acc, float* dst) { copy_out(acc, k_out * k_in, dst); };
  factorized_driver(p, plan, k_out * k_in, tile, finish);
}

}  // namespace grass
