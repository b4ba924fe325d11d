// adjoint_matching_loss (M26, M28, M32), C++ CPU kernel.
// elementwise / norm: per (sample, chunk) task, diff = v_ft - v_base - u* with u* = -grad c*(a/lam) (M26),
//   partial sum of diff^2 and the gradient 2*diff/D in place (M28); 'norm' first sums (a/lam)^2 per
//   sample for ||omega_b||. memoryless (M32): d = (2/sigma_b)(v_ft - v_base) + sigma_b*a; pass 1 sums d^2
//   per sample and writes (4/sigma_b) d / B with d still in cache; once s_b is known the clamped samples
//   (s_b >= lct) are zeroed: one pass over the inputs.
// Partials are fp32 (fp64 for fp64 inputs) and summed in a fixed order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "flowkern/cpu_vec.h"
#include "kernel.h"

namespace flowkern {
namespace cpu {
namespace {

// dst = coef * x (n elements); `tmp` (kChunk) holds the fp32 result before a bf16/fp16 store.
template <typename T>
void scale_store(const acc_t<T>* x, int64_t n, acc_t<T> coef, T* dst, acc_t<T>* tmp) {
  using A = acc_t<T>;
  using Vec = at::vec::Vectorized<A>;
  A* y = tmp;
  if constexpr (std::is_same_v<T, A>) y = dst;  // fp32/fp64: write in place
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(x + i) * Vec(coef)).store(y + i);
  for (; i < n; ++i) y[i] = x[i] * coef;
  if constexpr (!std::is_same_v<T, A>) store_from_acc<T>(tmp, dst, n);
}

// u* of (M26). elementwise: -a/lam (p = 2) or -sign(a)|a/lam|^exponent, exponent = 1/(p-1);
// norm: -(a/lam) * factor_b, factor_b = ||omega_b||^((2-p)/(p-1)).
template <typename A>
struct Control {
  int64_t mode;
  bool p2;
  A lam, exponent, factor;

  at::vec::Vectorized<A> operator()(const at::vec::Vectorized<A>& a) const {
    using Vec = at::vec::Vectorized<A>;
    const Vec omega = a / Vec(lam);
    if (mode == kAmElementwise) {
      if (p2) return omega.neg();
      const Vec mag = omega.abs().pow(Vec(exponent));
      return Vec::blendv(mag.neg(), mag, a < Vec(A(0)));
    }
    return omega.neg() * Vec(factor);
  }
  A operator()(A a) const {
    const A omega = a / lam;
    if (mode == kAmElementwise) {
      if (p2) return -omega;
      const A mag = std::pow(std::abs(omega), exponent);
      return a < A(0) ? mag : -mag;
    }
    return -omega * factor;
  }
};

// Sum of (a/lam)^2 over n elements (the norm pass of 'norm').
template <typename A>
A omega_sum_of_squares(const A* a, int64_t n, A lam) {
  using Vec = at::vec::Vectorized<A>;
  Vec acc(A(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec w = Vec::loadu(a + i) / Vec(lam);
    acc = acc + w * w;
  }
  A tail = 0;
  for (; i < n; ++i) {
    const A w = a[i] / lam;
    tail += w * w;
  }
  return lane_sum(acc) + tail;
}

template <typename T>
double control_loss(const T* v_ft, const T* v_base, const T* adj, T* grad, int64_t batch, int64_t d, int64_t mode,
                    double lam_d, double p) {
  using A = acc_t<T>;
  using Vec = at::vec::Vectorized<A>;
  const int64_t chunks = num_chunks(d);
  const A lam = A(lam_d);
  const A exponent = mode == kAmElementwise ? A(1.0 / (p - 1.0)) : A((2.0 - p) / (p - 1.0));
  const A grad_scale = A(2) / A(static_cast<double>(batch) * static_cast<double>(d));
  A* partial = partial_sums<A>(batch * chunks + batch);  // per task, then the factor per sample
  A* factor = partial + batch * chunks;
  std::fill(factor, factor + batch, A(1));
  if (mode == kAmNorm) {  // per-sample ||omega_b||, omega = a/lam (M26)
    parallel_tasks(batch * chunks, std::min(d, kChunk), [&](int64_t begin, int64_t end) {
      A* buf = scratch<A>(kChunk);  // per-thread, reused
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / chunks, start = (task % chunks) * kChunk, n = std::min(kChunk, d - start);
        partial[task] = omega_sum_of_squares(as_acc(adj + b * d + start, n, buf), n, lam);
      }
    });
    for (int64_t b = 0; b < batch; ++b) {  // fixed order
      A s = 0;
      for (int64_t c = 0; c < chunks; ++c) s += partial[b * chunks + c];
      A norm = std::sqrt(s);
      if (exponent < 0) norm = std::max(norm, A(1e-12));  // ||omega||^negative at omega = 0
      factor[b] = std::pow(norm, exponent);
    }
  }
  parallel_tasks(batch * chunks, std::min(d, kChunk), [&](int64_t begin, int64_t end) {
    A* buf = scratch<A>(3 * kChunk + kChunk);  // per-thread, reused
    A* diff = buf + 3 * kChunk;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, start = (task % chunks) * kChunk;
      const int64_t n = std::min(kChunk, d - start), off = b * d + start;
      const Control<A> control{mode, p == 2.0, lam, exponent, factor[b]};
      const A* vf = as_acc(v_ft + off, n, buf);
      const A* vb = as_acc(v_base + off, n, buf + kChunk);
      const A* a = as_acc(adj + off, n, buf + 2 * kChunk);
      Vec acc(A(0));
      int64_t i = 0;
      for (; i + Vec::size() <= n; i += Vec::size()) {
        const Vec x = Vec::loadu(vf + i) - Vec::loadu(vb + i) - control(Vec::loadu(a + i));
        acc = acc + x * x;
        x.store(diff + i);
      }
      A tail = 0;
      for (; i < n; ++i) {
        const A x = vf[i] - vb[i] - control(a[i]);
        tail += x * x;
        diff[i] = x;
      }
      partial[task] = lane_sum(acc) + tail;
      if (grad != nullptr) scale_store<T>(diff, n, grad_scale, grad + off, buf);
    }
  });
  double total = 0;  // fixed order
  for (int64_t task = 0; task < batch * chunks; ++task) total += partial[task];
  return total / (static_cast<double>(batch) * static_cast<double>(d));
}

// d = (2/sigma)(v_ft - v_base) + sigma*a into `out`; returns sum d^2 (M32).
template <typename A>
A memoryless_residual(const A* vf, const A* vb, const A* a, int64_t n, A sigma, A* out) {
  using Vec = at::vec::Vectorized<A>;
  const A two_over_sigma = A(2) / sigma;
  Vec acc(A(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec x = Vec(two_over_sigma) * (Vec::loadu(vf + i) - Vec::loadu(vb + i)) + Vec(sigma) * Vec::loadu(a + i);
    acc = acc + x * x;
    x.store(out + i);
  }
  A tail = 0;
  for (; i < n; ++i) {
    const A x = two_over_sigma * (vf[i] - vb[i]) + sigma * a[i];
    tail += x * x;
    out[i] = x;
  }
  return lane_sum(acc) + tail;
}

template <typename T>
double memoryless_loss(const T* v_ft, const T* v_base, const T* adj, Coef<acc_t<T>> sigma, T* grad, int64_t batch,
                       int64_t d, double lct_d) {
  using A = acc_t<T>;
  const int64_t chunks = num_chunks(d);
  const A lct = A(lct_d);
  // dL/dv_ft = 1[s_b < lct] (4/sigma_b) d / B (M32), in one pass: the gradient is written with d still in cache as
  // if every sample were active, then the (rare) clamped samples are zeroed once s_b is known.
  A* partial = partial_sums<A>(batch * chunks + batch);  // per task, then per sample
  A* sums = partial + batch * chunks;
  parallel_tasks(batch * chunks, std::min(d, kChunk), [&](int64_t begin, int64_t end) {
    A* buf = scratch<A>(5 * kChunk);  // per-thread, reused
    A* residual = buf + 4 * kChunk;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, start = (task % chunks) * kChunk;
      const int64_t n = std::min(kChunk, d - start), off = b * d + start;
      const A* vf = as_acc(v_ft + off, n, buf);
      const A* vb = as_acc(v_base + off, n, buf + kChunk);
      const A* a = as_acc(adj + off, n, buf + 2 * kChunk);
      partial[task] = memoryless_residual(vf, vb, a, n, sigma[b], residual);
      if (grad != nullptr) scale_store<T>(residual, n, A(4) / (sigma[b] * A(batch)), grad + off, buf + 3 * kChunk);
    }
  });
  for (int64_t b = 0; b < batch; ++b) {  // fixed order
    A s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[b * chunks + c];
    sums[b] = s;
    if (grad != nullptr && !(s < lct)) std::fill(grad + b * d, grad + (b + 1) * d, T(0));  // clamped: no gradient
  }
  double total = 0;  // (1/B) sum_b min(s_b, lct), fixed order
  for (int64_t b = 0; b < batch; ++b) total += static_cast<double>(std::min(sums[b], lct));
  return total / static_cast<double>(batch);
}

}  // namespace

}  // namespace cpu

template <>
std::tuple<at::Tensor, at::Tensor> run_adjoint_matching_loss<c10::kCPU>(const args::AdjointMatchingLoss& a) {
  using namespace cpu;
  const at::Tensor& v_ft = a.v_ft;
  const int64_t batch = v_ft.size(0), d = v_ft.numel() / batch, mode = adjoint_matching_mode(a);
  at::Tensor grad = a.compute_grad ? at::empty(v_ft.sizes(), v_ft.options()) : at::empty({0}, v_ft.options());
  const auto loss_type = v_ft.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v_ft.scalar_type(), "adjoint_matching_loss_cpu", [&] {
    const scalar_t* vf = v_ft.const_data_ptr<scalar_t>();
    const scalar_t* vb = a.v_base.const_data_ptr<scalar_t>();
    const scalar_t* adj = a.adjoint.const_data_ptr<scalar_t>();
    scalar_t* g = a.compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    if (mode == kAmMemoryless) {
      loss = memoryless_loss<scalar_t>(vf, vb, adj, a.sigma.get<acc_t<scalar_t>>(), g, batch, d, a.lct);
    } else {
      loss = control_loss<scalar_t>(vf, vb, adj, g, batch, d, mode, a.lam, a.p);
    }
  });
  return {scalar_output(loss, v_ft.options().dtype(loss_type)), grad};
}

}  // namespace flowkern
