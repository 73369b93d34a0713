// Compile-time switches: one way to turn a run-time value into a template parameter, for the
// host code of the CPU and the CUDA kernels alike. Each switch calls f with a
// std::integral_constant, so the callee reads the value as decltype(arg)::value and the
// compiler emits one instantiation per case, and only those.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

namespace grass {

// f(std::integral_constant<T, V>{}) for the V among Cases equal to value, else
// f(std::integral_constant<T, Default>{}), T being the type of Default (an integer, bool or
// enum).
template <auto Default, decltype(Default)... Cases, typename V, typename F>
void switch_value(V value, F&& f) {
  using T = decltype(Default);
  const bool matched =
      ((value == Cases ? (f(std::integral_constant<T, Cases>{}), true) : false) || ...);
  if (!matched) f(std::integral_constant<T, Default>{});
}

// f(std::bool_constant<flag>{}).
template <typename F>
void switch_bool(bool flag, F&& f) {
  switch_value<false, true>(flag, std::forward<F>(f));
}

// The copies per coordinate c of an SJLT table as a template parameter C: the common small c
// (1, 2, 4) as itself, so the per-coordinate copy loop unrolls, any other c as kRuntimeCopies
// (the loop reads c at run time). copies<C>(c) is the count either way: for a fixed C a
// std::integral_constant, whose value its type carries, so it stays a compile-time constant
// even where the count is captured into an OpenMP region's outlined body.
constexpr int kRuntimeCopies = 0;

template <typename F>
void switch_copies(int64_t c, F&& f) {
  switch_value<kRuntimeCopies, 1, 2, 4>(c, std::forward<F>(f));
}

template <int C>
constexpr auto copies(int64_t c) {
  if constexpr (C != kRuntimeCopies) {
    return std::integral_constant<int64_t, C>{};
  } else {
    return c;
  }
}

}  // namespace grass
