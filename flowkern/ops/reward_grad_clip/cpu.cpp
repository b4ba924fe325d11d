// reward_grad_clip (M8), C++ CPU kernel.
// Pass 1: per (sample, chunk) task, the fp32 partial sum of grad^2; n_b = sqrt(sum of the sample's
// partials in chunk order). Pass 2: ghat = min(n_b, tau)/max(n_b, 1e-12) * grad. A sample of one
// chunk is clipped by one task while it is still in cache (2D traffic).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "flowkern/cpu_vec.h"
#include "kernel.h"

namespace flowkern {
namespace cpu {
namespace {

template <typename A>
A sum_of_squares(const A* x, int64_t n) {
  using Vec = at::vec::Vectorized<A>;
  Vec acc(A(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec v = Vec::loadu(x + i);
    acc = acc + v * v;
  }
  A tail = 0;
  for (; i < n; ++i) tail += x[i] * x[i];
  return lane_sum(acc) + tail;
}

// ||x|| of a sample whose plain sum of squares overflows (finite entries, norm up to the type's max): m sqrt(sum
// (x/m)^2), m = max |x|. Runs only when the plain sum is inf (rare), serially, so it stays deterministic.
template <typename T>
acc_t<T> scaled_norm(const T* x, int64_t n) {
  using A = acc_t<T>;
  A m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::abs(static_cast<A>(x[i])));
  if (!std::isfinite(m)) return std::numeric_limits<A>::infinity();  // an inf entry
  A s = 0;
  for (int64_t i = 0; i < n; ++i) {
    const A y = static_cast<A>(x[i]) / m;
    s += y * y;
  }
  return m * std::sqrt(s);
}

// n_b from its sum of squares s, rescaled when s overflowed.
template <typename T>
acc_t<T> norm_of(acc_t<T> s, const T* x, int64_t n) {
  return std::isinf(s) ? scaled_norm(x, n) : std::sqrt(s);
}

// rho of (M8): min(n, tau) / max(n, 1e-12).
template <typename A>
A clip_factor(A norm, A tau) {
  return std::min(norm, tau) / std::max(norm, A(1e-12));
}

// dst = rho * x (n elements); `tmp` (kChunk) holds the fp32 result before a bf16/fp16 store.
template <typename T>
void scale_store(const acc_t<T>* x, int64_t n, acc_t<T> rho, T* dst, acc_t<T>* tmp) {
  using A = acc_t<T>;
  using Vec = at::vec::Vectorized<A>;
  A* y = tmp;
  if constexpr (std::is_same_v<T, A>) y = dst;  // fp32/fp64: write in place
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(x + i) * Vec(rho)).store(y + i);
  for (; i < n; ++i) y[i] = x[i] * rho;
  if constexpr (!std::is_same_v<T, A>) store_from_acc<T>(tmp, dst, n);
}

template <typename T>
void clip_kernel(const T* grad, T* out, acc_t<T>* norms, int64_t batch, int64_t d, double tau_d) {
  using A = acc_t<T>;
  const int64_t chunks = num_chunks(d);
  const A tau = A(tau_d);
  if (chunks == 1) {  // one task per sample: norm and scale while the sample is in cache
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      A* buf = scratch<A>(2 * kChunk);  // per-thread, reused
      for (int64_t b = begin; b < end; ++b) {
        const A* x = as_acc(grad + b * d, d, buf);
        const A norm = norm_of(sum_of_squares(x, d), grad + b * d, d);
        norms[b] = norm;
        scale_store<T>(x, d, clip_factor(norm, tau), out + b * d, buf + kChunk);
      }
    });
    return;
  }
  std::vector<A> partial(batch * chunks);
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    A* buf = scratch<A>(kChunk);  // per-thread, reused
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, start = (task % chunks) * kChunk, n = std::min(kChunk, d - start);
      partial[task] = sum_of_squares(as_acc(grad + b * d + start, n, buf), n);
    }
  });
  for (int64_t b = 0; b < batch; ++b) {  // fixed order
    A s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[b * chunks + c];
    norms[b] = norm_of(s, grad + b * d, d);
  }
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    A* buf = scratch<A>(2 * kChunk);  // per-thread, reused
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, start = (task % chunks) * kChunk, n = std::min(kChunk, d - start);
      const int64_t off = b * d + start;
      scale_store<T>(as_acc(grad + off, n, buf), n, clip_factor(norms[b], tau), out + off,
                     buf + kChunk);
    }
  });
}

}  // namespace

}  // namespace cpu

template <>
std::tuple<at::Tensor, at::Tensor> run_reward_grad_clip<c10::kCPU>(const args::RewardGradClip& a) {
  using namespace cpu;
  const at::Tensor& grad = a.grad;
  const int64_t batch = grad.size(0), d = grad.numel() / batch;
  const auto norm_type = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty(grad.sizes(), grad.options());
  at::Tensor norms = at::empty({batch}, grad.options().dtype(norm_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "reward_grad_clip_cpu", [&] {
    clip_kernel<scalar_t>(grad.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                          norms.mutable_data_ptr<acc_t<scalar_t>>(), batch, d, a.tau);
  });
  return {out, norms};
}

}  // namespace flowkern
