// CPU (C++/OpenMP) kernels of the factorized ops: logra, fact_grass, fact_sjlt.
// Semantics: grass_kernels/reference.py. acts (B, T, d_in) and grads (B, T, d_out) in fp32,
// bf16 or fp16 with any strides; fp32 accumulation and output.
//
// All three ops have one shape: per example b, per tile of token rows, fill two fp32 tiles
//     U (tokens x n_out) from grads,   V (tokens x n_in) from acts (token mask and bias folded in)
// and accumulate A += U^T V (n_out x n_in) in a per-thread buffer; at the end of the example
// A is written out (logra, fact_sjlt) or scaled and scattered into the SJLT buckets
// (fact_grass). What differs is how U and V are filled:
//     fact_grass  gather the k_o' / k_i' masked columns (index d_in of acts = virtual 1.0),
//                 prefetching the columns of a row a few rows ahead (a gather of scattered
//                 columns is otherwise latency-bound)
//     logra       project the rows: X P_in^T, Delta P_out^T (bias: + P_in[:, d_in])
//     fact_sjlt   hash-scatter the rows into k_in / k_out buckets, 16 tokens at a time as one
//                 AVX-512 vector per bucket (the tiles are then token-minor)
// Nothing proportional to B*T*k or B*d_out*d_in is ever allocated: the workspace is
// threads x (tile rows x (n_in + n_out + one converted input row) + n_out x n_in) floats.
//
// The dense products (A += U^T V and logra's projections) go to ATen's addmm / mm on
// from_blob views of the per-thread buffers, i.e. MKL's sgemm, called from inside our
// parallel region, where it runs single-threaded: it is faster than a hand-written
// micro-kernel would be and its call overhead (a few microseconds) is paid once per tile.
// Parallelism: examples are split over threads; with fewer examples than threads each
// example's tokens are split into chunks whose results are summed at the end (both the
// copy-out and the SJLT scatter are linear, so partial results add).
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>

#include "common.h"

namespace grass {
namespace {

// Floats per tile (U, V and converted input rows) per thread: ~1 MB, the L2 of this CPU.
constexpr int64_t kTileFloats = 1 << 18;
constexpr int64_t kMaxTileRows = 512;
// How many token rows ahead fact_grass prefetches its gathered columns.
constexpr int64_t kPrefetchRows = 4;
// fact_sjlt sketches this many tokens at once, as one fp32 vector per bucket (AVX-512 width);
// without AVX-512 (or for strided rows) it transposes kBlock coordinates of them at a time
// into an L1 buffer (kBlock x kLanes floats).
constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 64;

// One (B, T, d) input, read row by row into fp32, whatever its dtype and strides.
struct Rows {
  const char* data;
  at::ScalarType dtype;
  int64_t itemsize, sb, st, sd;  // strides in elements

  explicit Rows(const at::Tensor& t)
      : data(static_cast<const char*>(t.data_ptr())),
        dtype(t.scalar_type()),
        itemsize(t.element_size()),
        sb(t.stride(0)),
        st(t.stride(1)),
        sd(t.stride(2)) {}

  const char* row(int64_t b, int64_t t) const { return data + (b * sb + t * st) * itemsize; }
};

// dst[j] = m * x[off[j]] for row (b, t), off in elements. Branch-free, so it vectorises into
// hardware gathers; the virtual bias column is patched in by the caller.
void gather_row(const Rows& in, int64_t b, int64_t t, const int64_t* off, int64_t n, float m,
                float* dst) {
  GRASS_DISPATCH_FLOATING(in.dtype, "gather_row", [&] {
    const auto* x = reinterpret_cast<const scalar_t*>(in.row(b, t));
    for (int64_t j = 0; j < n; ++j) dst[j] = m * static_cast<float>(x[off[j]]);
  });
}

// Asks for the cache lines of row (b, t) that gather_row will read: a gather of k' scattered
// columns is latency-bound otherwise (one miss per column), fetched a few rows ahead it
// streams like a read.
void prefetch_row(const Rows& in, int64_t b, int64_t t, const int64_t* off, int64_t n) {
  const char* row = in.row(b, t);
  for (int64_t j = 0; j < n; ++j) __builtin_prefetch(row + off[j] * in.itemsize);
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

  Sketch(const at::Tensor& codes, int64_t rows, int64_t k, const at::Tensor& ref, const char* name,
         const char* k_name) {
    check_codes(codes, name, rows, ref);
    check_k(k, codes, k_name);
    auto cc = codes.contiguous();
    c = cc.size(1);
    buckets = at::empty_like(cc);
    weights = at::empty(cc.sizes(), cc.options().dtype(at::kFloat));
    const int32_t* code = cc.data_ptr<int32_t>();
    int32_t* bk = buckets.data_ptr<int32_t>();
    float* wt = weights.data_ptr<float>();
    const float w = 1.0f / std::sqrt(static_cast<float>(c));
    bool in_range = true;
    for (int64_t e = 0; e < cc.numel(); ++e) {
      bk[e] = code_bucket(code[e]);
      wt[e] = code_sign(code[e]) * w;
      in_range &= bk[e] < k;
    }
    TORCH_CHECK(in_range, name, " holds buckets outside [0, ", k, ")");
    bucket = bk;
    weight = wt;
  }

  // dst[h(e)] += s(e) / sqrt(c) * v for the c copies of row e.
  void add(int64_t e, float v, float* dst) const {
    for (int64_t j = e * c; j < (e + 1) * c; ++j) dst[bucket[j]] += weight[j] * v;
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
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const at::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));  // bf16 is fp32's top half
}

// Transposes 16 rows of 16 floats in registers: afterwards v[j] holds coordinate j of rows
// 0..15. 32-bit, then 64-bit interleaves within 128-bit lanes, then two 128-bit lane shuffles.
// Forced inline: called out of line (GCC's choice at -O3), v[16] makes a round trip through the
// stack on every 16 x 16 block, which cost fact_sjlt ~20% at the Llama MLP shapes.
[[gnu::always_inline]] inline void transpose16(__m512 v[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  auto pd = [](__m512 x) { return _mm512_castps_pd(x); };
  for (int i = 0; i < 4; ++i) {  // v[4i + j], lane L: coordinate 4L + j of rows 4i .. 4i + 3
    v[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[4 * i]), pd(t[4 * i + 2])));
    v[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[4 * i]), pd(t[4 * i + 2])));
    v[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[4 * i + 1]), pd(t[4 * i + 3])));
    v[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[4 * i + 1]), pd(t[4 * i + 3])));
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 s0 = _mm512_shuffle_f32x4(v[j], v[4 + j], 0x44);
    const __m512 s1 = _mm512_shuffle_f32x4(v[j], v[4 + j], 0xEE);
    const __m512 s2 = _mm512_shuffle_f32x4(v[8 + j], v[12 + j], 0x44);
    const __m512 s3 = _mm512_shuffle_f32x4(v[8 + j], v[12 + j], 0xEE);
    t[j] = _mm512_shuffle_f32x4(s0, s2, 0x88);
    t[j + 4] = _mm512_shuffle_f32x4(s0, s2, 0xDD);
    t[j + 8] = _mm512_shuffle_f32x4(s1, s3, 0x88);
    t[j + 12] = _mm512_shuffle_f32x4(s1, s3, 0xDD);
  }
  for (int j = 0; j < 16; ++j) v[j] = t[j];
}

// The vector path of sketch_tokens for unit-stride fp32/fp16/bf16 rows: 16 coordinates of the
// 16 rows per step, transposed in registers; returns how many coordinates it covered.
template <typename scalar_t>
int64_t sketch_tokens_avx512(const scalar_t* const* x, const float* m, int64_t n,
                             const Sketch& sk, float* vt, int64_t ld) {
  const int64_t covered = n / kLanes * kLanes;
  for (int64_t i0 = 0; i0 < covered; i0 += kLanes) {
    __m512 v[16];
    for (int r = 0; r < 16; ++r) {
      v[r] = x[r] ? _mm512_mul_ps(load16(x[r] + i0), _mm512_set1_ps(m[r])) : _mm512_setzero_ps();
    }
    transpose16(v);
    for (int q = 0; q < 16; ++q) {  // scatter_block with the columns still in registers
      for (int64_t e = (i0 + q) * sk.c; e < (i0 + q + 1) * sk.c; ++e) {
        float* dst = vt + sk.bucket[e] * ld;
        _mm512_storeu_ps(dst, _mm512_fmadd_ps(_mm512_set1_ps(sk.weight[e]), v[q],
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
      if (in.sd == 1) start = sketch_tokens_avx512<scalar_t>(x, m, n, sk, vt, ld);
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
  at::Tensor mask;
  const float* ptr = nullptr;
  int64_t T;

  TokenMask(const std::optional<at::Tensor>& m, int64_t tokens) : T(tokens) {
    if (m.has_value()) {
      mask = m->contiguous();
      ptr = mask.data_ptr<float>();
    }
  }
  float operator()(int64_t b, int64_t t) const { return ptr ? ptr[b * T + t] : 1.0f; }
};

// The shared driver. fill(b, t0, rows, stride, U, V, scratch) fills the tiles for tokens
// [t0, t0 + rows) of example b (stride: the row length of token-minor tiles); finish(A, dst) adds example (chunk) results into dst (width).
// scratch_floats: per-row scratch the fill needs (e.g. one converted input row).
// token_minor: the fill writes token-minor tiles (see accumulate_outer) in whole groups of
// kLanes tokens, so the tile length is a multiple of kLanes.
template <class Fill, class Finish>
at::Tensor factorized_driver(const at::Tensor& acts, int64_t n_out, int64_t n_in,
                             int64_t scratch_floats, int64_t width, bool token_minor,
                             const Fill& fill, const Finish& finish) {
  const int64_t B = acts.size(0), T = acts.size(1);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunks = B >= threads ? 1 : std::min<int64_t>(T, (threads + B - 1) / B);
  const int64_t per_row = n_in + n_out + scratch_floats;
  const int64_t chunk_rows = (T + chunks - 1) / chunks;
  int64_t tile = std::min({std::max<int64_t>(1, kTileFloats / per_row), kMaxTileRows, chunk_rows});
  // Token-minor tiles: feature rows of `stride` floats, room for `tile` tokens. The fill
  // updates one kLanes-float line in each of k rows per token group; a stride of an odd
  // number of cache lines spreads those lines over all L1 sets (a power of two, e.g. 256
  // tokens = 1 KB, would pile them into a few sets and evict them constantly).
  int64_t stride = tile;
  if (token_minor) {
    tile = (tile + kLanes - 1) / kLanes * kLanes;
    stride = tile / kLanes % 2 ? tile : tile + kLanes;
  }
  const int64_t per_thread = stride * per_row + n_out * n_in;
  auto fopts = acts.options().dtype(at::kFloat);
  // Workspace from ATen's allocator, so memory profilers see it like any other allocation.
  auto workspace = at::empty({threads, per_thread}, fopts);
  auto out = at::zeros({B, chunks, width}, fopts);
  float* ws = workspace.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();

  at::parallel_for(0, B * chunks, 1, [&](int64_t lo, int64_t hi) {
    float* u = ws + at::get_thread_num() * per_thread;
    float* v = u + stride * n_out;
    float* scratch = v + stride * n_in;
    float* acc = scratch + stride * scratch_floats;
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / chunks, chunk = item % chunks;
      const int64_t t_end = std::min(T, (chunk + 1) * chunk_rows);
      std::fill(acc, acc + n_out * n_in, 0.0f);
      for (int64_t t0 = chunk * chunk_rows; t0 < t_end; t0 += tile) {
        const int64_t rows = std::min(tile, t_end - t0);
        fill(b, t0, rows, stride, u, v, scratch);
        accumulate_outer(rows, n_out, n_in, u, v, acc, token_minor ? stride : 0);
      }
      finish(acc, out_ptr + item * width);
    }
  });
  return chunks == 1 ? out.view({B, width}) : out.sum(1);
}

void copy_out(const float* acc, int64_t n, float* dst) { std::copy(acc, acc + n, dst); }

// Element offsets idx * stride of the masked columns, checked against [0, limit). The virtual
// bias column (index d, when limit = d + 1) gets offset 0 and its position in bias_pos (else
// -1), so gathers stay branch-free and the caller overwrites that one entry.
at::Tensor column_offsets(const at::Tensor& idx, int64_t d, int64_t limit, int64_t stride,
                          const char* name, int64_t& bias_pos) {
  auto ix = idx.contiguous();
  auto off = at::empty_like(ix);
  const int64_t* in = ix.data_ptr<int64_t>();
  int64_t* o = off.data_ptr<int64_t>();
  bias_pos = -1;
  for (int64_t j = 0; j < ix.numel(); ++j) {
    TORCH_CHECK(in[j] >= 0 && in[j] < limit, name, " must lie in [0, ", limit, "), got ", in[j]);
    if (in[j] == d) bias_pos = j;
    o[j] = in[j] < d ? in[j] * stride : 0;
  }
  return off;
}

at::Tensor fact_grass_cpu(const at::Tensor& acts, const at::Tensor& grads,
                          const at::Tensor& in_indices, const at::Tensor& out_indices,
                          const at::Tensor& codes, int64_t k, double scale,
                          const std::optional<at::Tensor>& token_mask, bool bias) {
  check_linear(acts, grads, token_mask);
  check_indices(in_indices, "in_indices", acts);
  check_indices(out_indices, "out_indices", acts);
  const int64_t d_in = acts.size(2), d_out = grads.size(2);
  const int64_t n_in = in_indices.numel(), n_out = out_indices.numel();
  const Rows x(acts), g(grads);
  int64_t bias_pos, no_bias;
  auto off_in = column_offsets(in_indices, d_in, d_in + bias, x.sd, "in_indices", bias_pos);
  auto off_out = column_offsets(out_indices, d_out, d_out, g.sd, "out_indices", no_bias);
  const int64_t* oi = off_in.data_ptr<int64_t>();
  const int64_t* oo = off_out.data_ptr<int64_t>();
  const Sketch sk(codes, n_out * n_in, k, acts, "codes", "k");
  const TokenMask mask(token_mask, acts.size(1));
  const float s = static_cast<float>(scale);

  const int64_t T = acts.size(1);
  auto fill = [&](int64_t b, int64_t t0, int64_t rows, int64_t, float* u, float* v, float*) {
    for (int64_t r = 0; r < rows; ++r) {
      const float m = mask(b, t0 + r);
      if (t0 + r + kPrefetchRows < T) {
        prefetch_row(g, b, t0 + r + kPrefetchRows, oo, n_out);
        prefetch_row(x, b, t0 + r + kPrefetchRows, oi, n_in);
      }
      gather_row(g, b, t0 + r, oo, n_out, 1.0f, u + r * n_out);
      if (m == 0.0f) {
        std::fill(v + r * n_in, v + (r + 1) * n_in, 0.0f);  // padding: skip the read
      } else {
        gather_row(x, b, t0 + r, oi, n_in, m, v + r * n_in);
        if (bias_pos >= 0) v[r * n_in + bias_pos] = m;
      }
    }
  };
  auto finish = [&](const float* acc, float* dst) {
    for (int64_t e = 0; e < n_out * n_in; ++e) sk.add(e, s * acc[e], dst);
  };
  return factorized_driver(acts, n_out, n_in, 0, k, false, fill, finish);
}

at::Tensor logra_cpu(const at::Tensor& acts, const at::Tensor& grads, const at::Tensor& p_in,
                     const at::Tensor& p_out, const std::optional<at::Tensor>& token_mask,
                     bool bias) {
  check_linear(acts, grads, token_mask);
  const int64_t d_in = acts.size(2), d_out = grads.size(2);
  for (const auto& [p, name, cols] :
       {std::tuple{&p_in, "p_in", d_in + bias}, std::tuple{&p_out, "p_out", d_out}}) {
    TORCH_CHECK(p->scalar_type() == at::kFloat, name, " must be float32, got ", p->scalar_type());
    TORCH_CHECK(p->dim() == 2 && p->size(1) == cols && p->size(0) >= 1, name,
                " must have shape (k, ", cols, "), got ", p->sizes());
    check_same_device(*p, name, acts);
  }
  auto pi = p_in.contiguous(), po = p_out.contiguous();
  const int64_t k_in = pi.size(0), k_out = po.size(0);
  // The bias column of P_in as a contiguous k_in vector (bias adds m_t * p_bias to x_t P_in^T).
  auto p_bias = bias ? pi.select(1, d_in).contiguous() : at::Tensor();
  const float* pb = bias ? p_bias.data_ptr<float>() : nullptr;
  const float* pin = pi.data_ptr<float>();
  const float* pout = po.data_ptr<float>();
  const Rows x(acts), g(grads);
  const TokenMask mask(token_mask, acts.size(1));
  // fp32 rows with a unit stride feed the GEMM in place; anything else is converted per tile.
  const bool direct_x = x.dtype == at::kFloat && x.sd == 1;
  const bool direct_g = g.dtype == at::kFloat && g.sd == 1;
  const int64_t scratch = std::max(direct_x ? 0 : d_in, direct_g ? 0 : d_out);

  // Y (rows x k) = (rows of `in`) P^T, reading the rows in place when possible.
  auto project_rows = [&](const Rows& in, bool direct, int64_t d, int64_t b, int64_t t0,
                          int64_t rows, const float* p, int64_t ldp, int64_t k, float* y,
                          float* buf) {
    if (direct) {
      project(rows, d, k, reinterpret_cast<const float*>(in.row(b, t0)), in.st, p, ldp, y);
      return;
    }
    for (int64_t r = 0; r < rows; ++r) load_row(in, b, t0 + r, d, buf + r * d);
    project(rows, d, k, buf, d, p, ldp, y);
  };
  auto fill = [&](int64_t b, int64_t t0, int64_t rows, int64_t, float* u, float* v, float* buf) {
    project_rows(x, direct_x, d_in, b, t0, rows, pin, d_in + bias, k_in, v, buf);
    if (pb || mask.ptr) {
      for (int64_t r = 0; r < rows; ++r) {
        const float m = mask(b, t0 + r);
        float* row = v + r * k_in;
        for (int64_t j = 0; j < k_in; ++j) row[j] = m * (row[j] + (pb ? pb[j] : 0.0f));
      }
    }
    project_rows(g, direct_g, d_out, b, t0, rows, pout, d_out, k_out, u, buf);
  };
  auto finish = [&](const float* acc, float* dst) { copy_out(acc, k_out * k_in, dst); };
  return factorized_driver(acts, k_out, k_in, scratch, k_out * k_in, false, fill, finish);
}

at::Tensor fact_sjlt_cpu(const at::Tensor& acts, const at::Tensor& grads,
                         const at::Tensor& codes_in, const at::Tensor& codes_out, int64_t k_in,
                         int64_t k_out, const std::optional<at::Tensor>& token_mask, bool bias) {
  check_linear(acts, grads, token_mask);
  const int64_t d_in = acts.size(2), d_out = grads.size(2);
  const Sketch sk_in(codes_in, d_in + bias, k_in, acts, "codes_in", "k_in");
  const Sketch sk_out(codes_out, d_out, k_out, acts, "codes_out", "k_out");
  const Rows x(acts), g(grads);
  const TokenMask mask(token_mask, acts.size(1));

  // Token-minor tiles: feature rows of ld floats, tokens in groups of kLanes.
  auto fill = [&](int64_t b, int64_t t0, int64_t rows, int64_t ld, float* u, float* v, float*) {
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
  };
  auto finish = [&](const float* acc, float* dst) { copy_out(acc, k_out * k_in, dst); };
  return factorized_driver(acts, k_out, k_in, 0, k_out * k_in, true, fill, finish);
}

}  // namespace

TORCH_LIBRARY_IMPL(grass_kernels, CPU, m) {
  m.impl("logra", &logra_cpu);
  m.impl("fact_grass", &fact_grass_cpu);
  m.impl("fact_sjlt", &fact_sjlt_cpu);
}

}  // namespace grass
