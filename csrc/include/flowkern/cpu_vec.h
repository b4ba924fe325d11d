// Helpers for the C++ CPU kernels: fixed-size chunks (deterministic, batch-invariant reductions)
// and chunk-wise conversion of bf16/fp16 to fp32 so the arithmetic runs on at::vec::Vectorized<float>.
#pragma once
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace flowkern {
namespace cpu {

// Elements per (sample, chunk) task. Depends on nothing but this constant, so reductions are
// batch-invariant and identical run to run.
constexpr int64_t kChunk = 8192;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline int64_t num_chunks(int64_t d) { return (d + kChunk - 1) / kChunk; }

// A read-only view of n elements of T as acc_t<T>: zero-copy for float/double, converted into
// `buf` (kChunk elements) for bf16/fp16.
template <typename T>
inline const acc_t<T>* as_acc(const T* src, int64_t n, acc_t<T>* buf) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return src;
  } else {
    at::vec::convert(src, buf, n);
    return buf;
  }
}

// Store n acc_t<T> values as T.
template <typename T>
inline void store_from_acc(const acc_t<T>* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// Sum of a Vectorized accumulator's lanes in a fixed order.
template <typename A>
inline A lane_sum(const at::vec::Vectorized<A>& v) {
  alignas(64) A lanes[at::vec::Vectorized<A>::size()];
  v.store(lanes);
  A s = 0;
  for (int64_t i = 0; i < at::vec::Vectorized<A>::size(); ++i) s += lanes[i];
  return s;
}

// eta_t of (M15): 0 quad t^2, 1 linear t, 2 constant 1.
template <typename A>
inline A eta_of(A t, int64_t mode) {
  return mode == 0 ? t * t : (mode == 1 ? t : A(1));
}

}  // namespace cpu
}  // namespace flowkern
