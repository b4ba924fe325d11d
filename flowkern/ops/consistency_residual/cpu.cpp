// consistency_residual (M17, M18, M20) and consistency_residual_exact (M21), C++ CPU kernels.
// Forward, one pass per (sample, chunk) task: R, partial sums of R^2 and c^2, q = 2R/D (fp32) for the backward.
// Backward, one pass: gradients of grad_cons*L_cons + grad_bnd*L_bnd wrt c, c_t, c_x from q (c read only where
// m_b != 0). Exact forward: R = dG + T3, partial sums, dL_cons/ddG = 2R/D in dG's dtype. Partials summed in order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "flowkern/cpu_vec.h"
#include "kernel.h"

namespace flowkern {
namespace cpu {
namespace {

// e_b of (M20): +eps_t, or -eps_t where t + eps_t > 1 (the test runs in A, as in every backend)
template <typename A>
inline A signed_step(A t, A eps_t) {
  return t + eps_t <= A(1) ? eps_t : -eps_t;
}

// (L_cons, L_bnd) from per-task partials (R^2, c^2), summed in a fixed order.
template <typename A>
std::pair<double, double> finish(const A* partial, Coef<A> mask, int64_t batch, int64_t chunks,
                                 double numel) {
  double cons = 0, bnd = 0;
  for (int64_t b = 0; b < batch; ++b) {
    double per_sample = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      cons += partial[2 * (b * chunks + k)];
      per_sample += partial[2 * (b * chunks + k) + 1];
    }
    if (mask[b] != A(0)) bnd += double(mask[b]) * per_sample;  // (1/B) sum_b m_b sum c^2 / D_b
  }
  return {cons / numel, bnd / numel};
}

template <typename T>
void residual_kernel(const T* const* in, Coef<acc_t<T>> t, Coef<acc_t<T>> rho_w, Coef<acc_t<T>> rho_g,
                     acc_t<T>* q, acc_t<T>* partial, int64_t batch, int64_t d, double beta,
                     int64_t eta_mode, double eps_t, double eps_x) {
  using A = acc_t<T>;
  using Vec = at::vec::Vectorized<A>;
  const int64_t chunks = num_chunks(d);
  const A q_scale = A(2.0 / (static_cast<double>(batch) * static_cast<double>(d)));
  parallel_tasks(batch * chunks, std::min(d, kChunk), [&](int64_t begin, int64_t end) {
    A* buf = scratch<A>(8 * kSub);  // per-thread, reused
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, start = (task % chunks) * kChunk, n = std::min(kChunk, d - start);
      const A tb = t[b], step = signed_step(tb, A(eps_t)), inv_step = A(1) / step;
      const A coef = A(beta) * eta_of(tb, eta_mode), coef_t = A(beta) * eta_of(tb + step, eta_mode);
      const A k_w = rho_w[b] / A(eps_x), k_g = rho_g[b] / A(eps_x);
      Vec acc_r(A(0)), acc_c(A(0));
      A tail_r = 0, tail_c = 0;
      for (int64_t s = 0; s < n; s += kSub) {
        const int64_t m = std::min(kSub, n - s), off = b * d + start + s;
        const A* p[8];
        for (int k = 0; k < 8; ++k) p[k] = as_acc(in[k] + off, m, buf + k * kSub);
        const A *c = p[0], *c_t = p[1], *c_x = p[2], *g = p[3], *g_t = p[4], *g_x = p[5], *vb = p[6], *vb_g = p[7];
        A* qs = q == nullptr ? nullptr : q + off;
        int64_t i = 0;
        for (; i + Vec::size() <= m; i += Vec::size()) {
          const Vec cv = Vec::loadu(c + i);
          const Vec gv = cv - Vec(coef) * Vec::loadu(g + i);
          const Vec gt = Vec::loadu(c_t + i) - Vec(coef_t) * Vec::loadu(g_t + i);
          const Vec gx = Vec::loadu(c_x + i) - Vec(coef) * Vec::loadu(g_x + i);
          const Vec r = (gt - gv) * Vec(inv_step) + Vec(k_w) * (gx - gv) +
                        Vec(k_g) * (Vec::loadu(vb_g + i) - Vec::loadu(vb + i));
          acc_r = acc_r + r * r;
          acc_c = acc_c + cv * cv;
          if (qs != nullptr) (r * Vec(q_scale)).store(qs + i);
        }
        for (; i < m; ++i) {  // kSub % Vec::size() == 0: only the last sub-block has a tail
          const A gv = c[i] - coef * g[i], gt = c_t[i] - coef_t * g_t[i], gx = c_x[i] - coef * g_x[i];
          const A r = (gt - gv) * inv_step + k_w * (gx - gv) + k_g * (vb_g[i] - vb[i]);
          tail_r += r * r;
          tail_c += c[i] * c[i];
          if (qs != nullptr) qs[i] = r * q_scale;
        }
      }
      partial[2 * task] = lane_sum(acc_r) + tail_r;
      partial[2 * task + 1] = lane_sum(acc_c) + tail_c;
    }
  });
}

// out[i] = q[i] * s (+ s_b * c[i] when c != nullptr), written as T.
template <typename T>
inline void scaled_store(const acc_t<T>* q, acc_t<T> s, const acc_t<T>* c, acc_t<T> s_b, T* dst, int64_t m,
                         acc_t<T>* scratch) {
  using A = acc_t<T>;
  using Vec = at::vec::Vectorized<A>;
  A* out = std::is_same_v<T, A> ? reinterpret_cast<A*>(dst) : scratch;  // fp32/fp64: straight to the output
  int64_t i = 0;
  if (c == nullptr) {
    for (; i + Vec::size() <= m; i += Vec::size()) (Vec::loadu(q + i) * Vec(s)).store(out + i);
    for (; i < m; ++i) out[i] = q[i] * s;
  } else {
    for (; i + Vec::size() <= m; i += Vec::size())
      (Vec::loadu(q + i) * Vec(s) + Vec(s_b) * Vec::loadu(c + i)).store(out + i);
    for (; i < m; ++i) out[i] = q[i] * s + s_b * c[i];
  }
  if constexpr (!std::is_same_v<T, A>) store_from_acc<T>(scratch, dst, m);
}

template <typename T>
void residual_backward_kernel(acc_t<T> grad_cons, acc_t<T> grad_bnd, const acc_t<T>* q, const T* c,
                              Coef<acc_t<T>> t, Coef<acc_t<T>> rho_w, Coef<acc_t<T>> mask, T* grad_c,
                              T* grad_c_t, T* grad_c_x, int64_t batch, int64_t d, double eps_t, double eps_x) {
  using A = acc_t<T>;
  const int64_t chunks = num_chunks(d);
  const A bnd_scale = A(2.0 / (static_cast<double>(batch) * static_cast<double>(d)));
  parallel_tasks(batch * chunks, std::min(d, kChunk), [&](int64_t begin, int64_t end) {
    A* buf = scratch<A>(2 * kSub);  // per-thread, reused
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, start = (task % chunks) * kChunk, n = std::min(kChunk, d - start);
      const A inv_step = A(1) / signed_step(t[b], A(eps_t)), k_w = rho_w[b] / A(eps_x);
      const A s_t = grad_cons * inv_step, s_x = grad_cons * k_w, s_c = -grad_cons * (inv_step + k_w);
      const A s_b = grad_bnd * mask[b] * bnd_scale;
      for (int64_t s = 0; s < n; s += kSub) {
        const int64_t m = std::min(kSub, n - s), off = b * d + start + s;
        const A* qs = q + off;
        if (grad_c_t != nullptr) scaled_store<T>(qs, s_t, nullptr, A(0), grad_c_t + off, m, buf);
        if (grad_c_x != nullptr) scaled_store<T>(qs, s_x, nullptr, A(0), grad_c_x + off, m, buf);
        if (grad_c != nullptr) {  // c is read on terminal samples only (s_b == 0 elsewhere; c assumed finite)
          const A* cs = s_b != A(0) ? as_acc(c + off, m, buf + kSub) : nullptr;
          scaled_store<T>(qs, s_c, cs, s_b, grad_c + off, m, buf);
        }
      }
    }
  });
}

template <typename T>
void exact_kernel(const T* dG, const T* t3, const T* c, Coef<acc_t<T>> mask, T* grad, acc_t<T>* partial,
                  int64_t batch, int64_t d) {
  using A = acc_t<T>;
  using Vec = at::vec::Vectorized<A>;
  const int64_t chunks = num_chunks(d);
  const A grad_scale = A(2.0 / (static_cast<double>(batch) * static_cast<double>(d)));
  parallel_tasks(batch * chunks, std::min(d, kChunk), [&](int64_t begin, int64_t end) {
    A* buf = scratch<A>(4 * kSub);  // per-thread, reused
    A* scaled = buf + 3 * kSub;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, start = (task % chunks) * kChunk, n = std::min(kChunk, d - start);
      const bool terminal = mask[b] != A(0);  // c is read on terminal samples only (M17)
      Vec acc_r(A(0)), acc_c(A(0));
      A tail_r = 0, tail_c = 0;
      for (int64_t s = 0; s < n; s += kSub) {
        const int64_t m = std::min(kSub, n - s), off = b * d + start + s;
        const A* dg = as_acc(dG + off, m, buf);
        const A* t3s = as_acc(t3 + off, m, buf + kSub);
        A* out = grad == nullptr ? nullptr : (std::is_same_v<T, A> ? reinterpret_cast<A*>(grad + off) : scaled);
        int64_t i = 0;
        for (; i + Vec::size() <= m; i += Vec::size()) {
          const Vec r = Vec::loadu(dg + i) + Vec::loadu(t3s + i);
          acc_r = acc_r + r * r;
          if (out != nullptr) (r * Vec(grad_scale)).store(out + i);
        }
        for (; i < m; ++i) {
          const A r = dg[i] + t3s[i];
          tail_r += r * r;
          if (out != nullptr) out[i] = r * grad_scale;
        }
        if constexpr (!std::is_same_v<T, A>) {
          if (grad != nullptr) store_from_acc<T>(scaled, grad + off, m);
        }
        if (terminal) {
          const A* cs = as_acc(c + off, m, buf + 2 * kSub);
          int64_t j = 0;
          for (; j + Vec::size() <= m; j += Vec::size()) acc_c = acc_c + Vec::loadu(cs + j) * Vec::loadu(cs + j);
          for (; j < m; ++j) tail_c += cs[j] * cs[j];
        }
      }
      partial[2 * task] = lane_sum(acc_r) + tail_r;
      partial[2 * task + 1] = lane_sum(acc_c) + tail_c;
    }
  });
}

at::ScalarType acc_type_of(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

}  // namespace cpu

template <>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_consistency_residual<c10::kCPU>(
    const args::ConsistencyResidual& a) {
  using namespace cpu;
  const at::Tensor& c = a.c;
  const int64_t batch = c.size(0), d = c.numel() / batch;
  const auto acc_options = c.options().dtype(acc_type_of(c));
  at::Tensor q = a.compute_grad ? at::empty(c.sizes(), acc_options) : at::empty({0}, acc_options);
  std::pair<double, double> losses;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "consistency_residual_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* in[8] = {c.const_data_ptr<scalar_t>(),        a.c_t.const_data_ptr<scalar_t>(),
                             a.c_x.const_data_ptr<scalar_t>(),    a.ghat.const_data_ptr<scalar_t>(),
                             a.ghat_t.const_data_ptr<scalar_t>(), a.ghat_x.const_data_ptr<scalar_t>(),
                             a.vb.const_data_ptr<scalar_t>(),     a.vb_G.const_data_ptr<scalar_t>()};
    A* partial = partial_sums<A>(2 * batch * num_chunks(d));
    residual_kernel<scalar_t>(in, a.t.get<A>(), a.rho_w.get<A>(), a.rho_G.get<A>(),
                              a.compute_grad ? q.mutable_data_ptr<A>() : nullptr, partial, batch, d, a.beta,
                              eta_code(a.eta_mode), a.eps_t, a.eps_x);
    losses = finish(partial, a.mask.get<A>(), batch, num_chunks(d), static_cast<double>(c.numel()));
  });
  return {scalar_output(losses.first, acc_options), scalar_output(losses.second, acc_options), q};
}

template <>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_consistency_residual_backward<c10::kCPU>(
    const args::ConsistencyResidualBackward& a) {
  using namespace cpu;
  const at::Tensor& c = a.c;
  const int64_t batch = c.size(0), d = c.numel() / batch;
  auto make = [&](bool need) { return need ? at::empty(c.sizes(), c.options()) : at::empty({0}, c.options()); };
  at::Tensor grad_c = make(a.need_c), grad_c_t = make(a.need_c_t), grad_c_x = make(a.need_c_x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "consistency_residual_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    residual_backward_kernel<scalar_t>(
        *a.grad_cons.const_data_ptr<A>(), *a.grad_bnd.const_data_ptr<A>(), a.q.const_data_ptr<A>(),
        c.const_data_ptr<scalar_t>(), a.t.get<A>(), a.rho_w.get<A>(), a.mask.get<A>(),
        a.need_c ? grad_c.mutable_data_ptr<scalar_t>() : nullptr,
        a.need_c_t ? grad_c_t.mutable_data_ptr<scalar_t>() : nullptr,
        a.need_c_x ? grad_c_x.mutable_data_ptr<scalar_t>() : nullptr, batch, d, a.eps_t, a.eps_x);
  });
  return {grad_c, grad_c_t, grad_c_x};
}

template <>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_consistency_residual_exact<c10::kCPU>(
    const args::ConsistencyResidualExact& a) {
  using namespace cpu;
  const at::Tensor& dG = a.dG;
  const int64_t batch = dG.size(0), d = dG.numel() / batch;
  const auto acc_options = dG.options().dtype(acc_type_of(dG));
  at::Tensor grad = a.compute_grad ? at::empty(dG.sizes(), dG.options()) : at::empty({0}, dG.options());
  std::pair<double, double> losses;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dG.scalar_type(), "consistency_residual_exact_cpu", [&] {
    using A = acc_t<scalar_t>;
    A* partial = partial_sums<A>(2 * batch * num_chunks(d));
    exact_kernel<scalar_t>(dG.const_data_ptr<scalar_t>(), a.t3.const_data_ptr<scalar_t>(),
                           a.c.const_data_ptr<scalar_t>(), a.mask.get<A>(),
                           a.compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr, partial, batch, d);
    losses = finish(partial, a.mask.get<A>(), batch, num_chunks(d), static_cast<double>(dG.numel()));
  });
  return {scalar_output(losses.first, acc_options), scalar_output(losses.second, acc_options), grad};
}

}  // namespace flowkern
