// Helpers for the C++ CPU kernels: fixed-size chunks (deterministic, batch-invariant reductions)
// and chunk-wise conversion of bf16/fp16 to fp32 so the arithmetic runs on at::vec::Vectorized<float>.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

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

// n elements of S at src as A: zero-copy when S is A, else converted into buf.
template <typename S, typename A>
inline const A* as_acc_from(const S* src, int64_t n, A* buf) {
  if constexpr (std::is_same_v<S, A>) {
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

// A per-thread scratch buffer of at least n elements of A, reused across calls: no allocation or zero-fill per call
// (a fresh std::vector of a few chunks cost more than the whole kernel on small inputs). One live buffer per thread
// and type: a task slices it rather than asking twice.
template <typename A>
inline A* scratch(int64_t n) {
  thread_local std::vector<A> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// The per-task partial sums of one call (written by the tasks, then summed in order by the calling thread): a
// per-thread buffer of at least n elements, reused across calls (not the tasks' `scratch`, which the calling thread
// also uses while it runs tasks).
template <typename A>
inline A* partial_sums(int64_t n) {
  thread_local std::vector<A> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// at::parallel_for over `tasks` tasks of about `task_elements` elements each, inline on the calling thread when the
// whole call is small (a thread-pool round trip costs more than a few tens of thousands of elements of work).
constexpr int64_t kParallelElements = 32768;
template <typename F>
inline void parallel_tasks(int64_t tasks, int64_t task_elements, const F& f) {
  at::parallel_for(0, tasks, std::max<int64_t>(1, kParallelElements / std::max<int64_t>(task_elements, 1)), f);
}

// A 0-dim tensor holding `value` (a loss), written directly: no dispatcher call to fill it.
inline at::Tensor scalar_output(double value, const at::TensorOptions& options) {
  at::Tensor out = at::empty({}, options);
  if (out.scalar_type() == at::kDouble) {
    *out.mutable_data_ptr<double>() = value;
  } else {
    *out.mutable_data_ptr<float>() = static_cast<float>(value);
  }
  return out;
}

// Elements converted and processed at a time inside a chunk: a few such buffers stay in L1.
constexpr int64_t kSub = 512;

// An input whose element type is known at run time (mixed-dtype inputs are read without a cast copy).
struct Input {
  const void* data;
  at::ScalarType type;
};

// n elements of `in` from element `off` as A: zero-copy when the type is A, else converted into buf (n <= kSub).
template <typename A>
inline const A* load(Input in, int64_t off, int64_t n, A* buf) {
  switch (in.type) {
    case at::kFloat: return as_acc_from(static_cast<const float*>(in.data) + off, n, buf);
    case at::kDouble: return as_acc_from(static_cast<const double*>(in.data) + off, n, buf);
    case at::kBFloat16: return as_acc_from(static_cast<const c10::BFloat16*>(in.data) + off, n, buf);
    case at::kHalf: return as_acc_from(static_cast<const c10::Half*>(in.data) + off, n, buf);
    default: TORCH_CHECK(false, "flowkern: unsupported input dtype ", in.type);
  }
}

// An output of run-time element type: `target` gives where to write n values of A (the output itself when its type
// is A, else buf), `store` converts buf into the output afterwards.
struct Output {
  void* data;
  at::ScalarType type;

  template <typename A>
  A* target(int64_t off, A* buf) const {
    return type == c10::CppTypeToScalarType<A>::value ? static_cast<A*>(data) + off : buf;
  }
  template <typename A>
  void store(int64_t off, int64_t n, const A* buf) const {
    if (type == c10::CppTypeToScalarType<A>::value) return;
    switch (type) {
      case at::kFloat: at::vec::convert(buf, static_cast<float*>(data) + off, n); break;
      case at::kDouble: at::vec::convert(buf, static_cast<double*>(data) + off, n); break;
      case at::kBFloat16: at::vec::convert(buf, static_cast<c10::BFloat16*>(data) + off, n); break;
      case at::kHalf: at::vec::convert(buf, static_cast<c10::Half*>(data) + off, n); break;
      default: TORCH_CHECK(false, "flowkern: unsupported output dtype ", type);
    }
  }
};

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
