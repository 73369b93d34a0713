// SIMD helpers of the CPU kernels: fp32 vectors of N lanes (GCC vector extensions, which map to
// SSE/AVX/AVX-512 registers), loads of fp32/bf16/fp16 elements into them, the SJLT sign applied
// by flipping the sign bit, and the register transposes that turn N rows' vectors into N
// coordinates' vectors.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace grass {
namespace simd {

// The vector types of N lanes (GCC ignores vector_size on an alias template, not in a class).
template <int N>
struct Vectors {
  typedef float floats __attribute__((vector_size(N * sizeof(float))));
  typedef int32_t ints __attribute__((vector_size(N * sizeof(int32_t))));
  typedef uint16_t words __attribute__((vector_size(N * sizeof(uint16_t))));
  typedef uint32_t wide __attribute__((vector_size(N * sizeof(uint32_t))));
};
template <int N>
using Floats = typename Vectors<N>::floats;
template <int N>
using Ints = typename Vectors<N>::ints;

// p[0 .. N) as fp32 lanes, p needing no alignment. bf16 is fp32's top half, so its lanes are
// the 16-bit words widened and shifted; fp16 uses the AVX-512 conversion where there is one.
template <int N, typename scalar_t>
inline Floats<N> load_floats(const scalar_t* p) {
  Floats<N> v;
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(&v, p, sizeof v);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    typename Vectors<N>::words h;
    std::memcpy(&h, p, sizeof h);
    v = (Floats<N>)(__builtin_convertvector(h, typename Vectors<N>::wide) << 16);
#if defined(__AVX512F__)
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && N == 16) {
    v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#endif
  } else {
    for (int i = 0; i < N; ++i) v[i] = static_cast<float>(p[i]);
  }
  return v;
}

// v (a float or Floats<N>) with its sign flipped where the SJLT code is negative: sign -1 rides
// in the code's top bit.
template <typename V>
inline V apply_sign(V v, int32_t code) {
  const uint32_t sign = static_cast<uint32_t>(code) & 0x80000000u;
  if constexpr (std::is_same_v<V, float>) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    bits ^= sign;
    std::memcpy(&v, &bits, sizeof v);
    return v;
  } else {
    // A C-style cast between vector types of one size reinterprets the bits.
    return (V)((Ints<sizeof(V) / sizeof(float)>)v ^ static_cast<int32_t>(sign));
  }
}

// v[r][j] <-> v[j][r]: an 8 x 8 transpose in three stages of two-input shuffles (pairs of
// elements, pairs of pairs, 128-bit halves), 24 shuffles for 64 elements.
inline void transpose8(Floats<8> (&v)[8]) {
  Floats<8> t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(v[i], v[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(v[i], v[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    for (int h = 0; h < 2; ++h) {
      u[i + 2 * h] = __builtin_shufflevector(t[i + h], t[i + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 2 * h + 1] =
          __builtin_shufflevector(t[i + h], t[i + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  }
  for (int j = 0; j < 4; ++j) {
    v[j] = __builtin_shufflevector(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    v[j + 4] = __builtin_shufflevector(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

#if defined(__AVX512F__)
// v[r][j] <-> v[j][r] for 16 rows of 16 floats: 32-bit, then 64-bit interleaves within 128-bit
// lanes, then two 128-bit lane shuffles. Forced inline: out of line (GCC's choice at -O3), v[16]
// would make a round trip through the stack on every call.
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
#endif

}  // namespace simd
}  // namespace grass
