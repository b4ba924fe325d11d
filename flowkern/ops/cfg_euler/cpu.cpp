// cfg_euler (M5, M2, M6, M30), C++ CPU kernels. Elementwise over fixed (sample, chunk) tasks, so each task reads
// its per-sample coefficients once; bf16/fp16 chunks are converted to fp32 and back (cpu_vec.h).
// Forward: v = v_u + w(v_c - v_u), x_next = x + h v | x + h(2v - kappa x) + sqrt(h) sigma xi, x_hat1 = x + (1-t) v.
// Backward: gbar = 0 + g_v + c_n g_n + (1-t) g_h, d v_c = w gbar, d v_u = (1-w) gbar, d x = 0 + a_n g_n + g_h,
// summed in this order in every backend.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <vector>

#include "flowkern/cpu_vec.h"
#include "kernel.h"

namespace flowkern {
namespace cpu {
namespace {

// One element (V = A) or one Vectorized<A> lane group (V = Vectorized<A>): the same expression for both.
template <bool kCfg, bool kMemoryless, typename V>
inline void cfg_euler_element(V vu, V vc, V x, V noise, V w, V h, V one_minus_t, V kappa, V noise_scale, V& v,
                              V& x_next, V& x_hat) {
  v = kCfg ? vu + w * (vc - vu) : vc;  // (M5)
  if constexpr (kMemoryless) {
    x_next = x + h * (V(2) * v - kappa * x) + noise_scale * noise;  // (M30)
  } else {
    x_next = x + h * v;  // (M2)
  }
  x_hat = x + one_minus_t * v;  // (M6)
}

// Where a chunk of results in A goes: straight into the output when T == A, else into buf (then converted).
template <typename T, typename A>
inline A* acc_out(T* out, A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    return out;
  } else {
    return buf;
  }
}

template <typename T, typename A>
inline void finish_out(const A* acc, T* out, int64_t n) {
  if constexpr (!std::is_same_v<T, A>) store_from_acc<T>(acc, out, n);
}

template <typename TV, typename TX, bool kCfg, bool kMemoryless>
void cfg_euler_forward_kernel(const TV* vu, const TV* vc, const TX* x, const TX* noise, Coef<acc_t<TX>> w,
                              Coef<acc_t<TX>> h, Coef<acc_t<TX>> t, Coef<acc_t<TX>> kappa, Coef<acc_t<TX>> sigma,
                              TV* v_out, TX* next_out, TX* hat_out, int64_t batch, int64_t d) {
  using A = acc_t<TX>;
  using Vec = at::vec::Vectorized<A>;
  const int64_t chunks = num_chunks(d);
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    A* buf = scratch<A>(7 * kChunk);  // per-thread, reused
    A* bv = buf + 4 * kChunk;
    A* bn = buf + 5 * kChunk;
    A* bh = buf + 6 * kChunk;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, start = (task % chunks) * kChunk;
      const int64_t n = std::min(kChunk, d - start), off = b * d + start;
      const A wb = kCfg ? w[b] : A(0), hb = h[b], omt = A(1) - t[b];
      const A kb = kMemoryless ? kappa[b] : A(0);
      const A ns = kMemoryless ? std::sqrt(hb) * sigma[b] : A(0);
      const A* pc = as_acc(vc + off, n, buf);
      const A* pu = kCfg ? as_acc(vu + off, n, buf + kChunk) : pc;
      const A* px = as_acc(x + off, n, buf + 2 * kChunk);
      const A* pn = kMemoryless ? as_acc(noise + off, n, buf + 3 * kChunk) : px;
      A* ov = acc_out(v_out + off, bv);
      A* on = acc_out(next_out + off, bn);
      A* oh = acc_out(hat_out + off, bh);
      int64_t i = 0;
      for (; i + Vec::size() <= n; i += Vec::size()) {
        Vec v, x_next, x_hat;
        cfg_euler_element<kCfg, kMemoryless, Vec>(Vec::loadu(pu + i), Vec::loadu(pc + i), Vec::loadu(px + i),
                                                  Vec::loadu(pn + i), Vec(wb), Vec(hb), Vec(omt), Vec(kb), Vec(ns),
                                                  v, x_next, x_hat);
        v.store(ov + i);
        x_next.store(on + i);
        x_hat.store(oh + i);
      }
      for (; i < n; ++i) {
        cfg_euler_element<kCfg, kMemoryless, A>(pu[i], pc[i], px[i], pn[i], wb, hb, omt, kb, ns, ov[i], on[i],
                                                oh[i]);
      }
      finish_out(ov, v_out + off, n);
      finish_out(on, next_out + off, n);
      finish_out(oh, hat_out + off, n);
    }
  });
}

// y = y + alpha * x over n elements (no fused multiply-add: the same rounding as the reference).
template <typename A>
inline void axpy(A* y, A alpha, const A* x, int64_t n) {
  using Vec = at::vec::Vectorized<A>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(y + i) + Vec(alpha) * Vec::loadu(x + i)).store(y + i);
  for (; i < n; ++i) y[i] = y[i] + alpha * x[i];
}

// out = alpha * x over n elements.
template <typename A>
inline void scale(A* out, A alpha, const A* x, int64_t n) {
  using Vec = at::vec::Vectorized<A>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (Vec(alpha) * Vec::loadu(x + i)).store(out + i);
  for (; i < n; ++i) out[i] = alpha * x[i];
}

struct BackwardFlags {
  bool has_gv, has_gn, has_gh, xhat_grad, memoryless, need_u, need_c, need_x;
};

template <typename TV, typename TX>
void cfg_euler_backward_kernel(const TV* gv, const TX* gn, const TX* gh, Coef<acc_t<TX>> w, Coef<acc_t<TX>> h,
                               Coef<acc_t<TX>> t, Coef<acc_t<TX>> kappa, TV* du, TV* dc, TX* dx, int64_t batch,
                               int64_t d, BackwardFlags f) {
  using A = acc_t<TX>;
  const int64_t chunks = num_chunks(d);
  // L1-sized sub-blocks: the few passes over each (fill, axpy, scale) stay in cache
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    A* buf = scratch<A>(6 * kSub);  // per-thread, reused
    A* sum = buf + 3 * kSub;
    A* gx = buf + 4 * kSub;
    A* out = buf + 5 * kSub;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, start = (task % chunks) * kChunk, n_task = std::min(kChunk, d - start);
      const A hb = h[b], wb = w[b];
      const A step = f.memoryless ? A(2) * hb : hb;                       // d x_next / d v (M2, M30)
      const A keep = f.memoryless ? A(1) - hb * kappa[b] : A(1);          // d x_next / d x
      const bool gv_only = f.has_gv && !f.has_gn && !(f.has_gh && f.xhat_grad);  // training: gbar = g_v, no pass
      for (int64_t s = 0; s < n_task; s += kSub) {
        const int64_t n = std::min(kSub, n_task - s), off = b * d + start + s;
        const A* pn = f.has_gn ? as_acc(gn + off, n, buf + kSub) : nullptr;
        const A* ph = f.has_gh ? as_acc(gh + off, n, buf + 2 * kSub) : nullptr;
        if (f.need_u || f.need_c) {
          const A* gbar = sum;
          if (gv_only) {
            gbar = as_acc(gv + off, n, buf);
          } else {
            std::fill(sum, sum + n, A(0));
            if (f.has_gv) axpy(sum, A(1), as_acc(gv + off, n, buf), n);
            if (f.has_gn) axpy(sum, step, pn, n);
            if (f.has_gh && f.xhat_grad) axpy(sum, A(1) - t[b], ph, n);
          }
          if (f.need_c) {
            A* oc = acc_out(dc + off, out);
            scale(oc, wb, gbar, n);
            finish_out(oc, dc + off, n);
          }
          if (f.need_u) {
            A* ou = acc_out(du + off, out);
            scale(ou, A(1) - wb, gbar, n);
            finish_out(ou, du + off, n);
          }
        }
        if (f.need_x) {
          A* ox = acc_out(dx + off, gx);
          std::fill(ox, ox + n, A(0));
          if (f.has_gn) axpy(ox, keep, pn, n);
          if (f.has_gh) axpy(ox, A(1), ph, n);
          finish_out(ox, dx + off, n);
        }
      }
    }
  });
}

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& x) {
  return x.has_value() ? reinterpret_cast<const T*>(x->const_data_ptr()) : nullptr;
}

}  // namespace
}  // namespace cpu

template <>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_cfg_euler<c10::kCPU>(const args::CfgEuler& a) {
  const std::optional<at::Tensor>&v_uncond = a.v_uncond, &noise = a.noise;
  const at::Tensor &v_cond = a.v_cond, &x = a.x;
  const CoefArg &w = a.w, &h = a.h, &t = a.t, &kappa = a.kappa, &sigma = a.sigma;
  const int64_t mode = cfg_euler_mode(a);
  using namespace cpu;
  const int64_t batch = x.size(0), d = x.numel() / batch;
  at::Tensor v = at::empty(v_cond.sizes(), v_cond.options());
  at::Tensor x_next = at::empty(x.sizes(), x.options()), x_hat = at::empty(x.sizes(), x.options());
  const bool cfg = v_uncond.has_value(), memoryless = mode == 1;
  dispatch_velocity_state(v_cond.scalar_type(), x.scalar_type(), "cfg_euler_cpu", [&]<typename TV, typename TX>() {
    using A = acc_t<TX>;
    auto run = [&]<bool kCfg, bool kMemoryless>() {
      cfg_euler_forward_kernel<TV, TX, kCfg, kMemoryless>(
          data_or_null<TV>(v_uncond), v_cond.const_data_ptr<TV>(), x.const_data_ptr<TX>(), data_or_null<TX>(noise),
          w.get<A>(), h.get<A>(), t.get<A>(), kappa.get<A>(),
          sigma.get<A>(), v.mutable_data_ptr<TV>(), x_next.mutable_data_ptr<TX>(),
          x_hat.mutable_data_ptr<TX>(), batch, d);
    };
    if (cfg) {
      memoryless ? run.template operator()<true, true>() : run.template operator()<true, false>();
    } else {
      memoryless ? run.template operator()<false, true>() : run.template operator()<false, false>();
    }
  });
  return {v, x_next, x_hat};
}

template <>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_cfg_euler_backward<c10::kCPU>(
    const args::CfgEulerBackward& a) {
  using namespace cpu;
  const at::Tensor& like = cfg_euler_backward_like(a);
  const int64_t batch = like.size(0), d = like.numel() / batch;
  at::Tensor du, dc, dx;
  std::tie(du, dc, dx) = cfg_euler_backward_outputs(a);
  const BackwardFlags flags{a.grad_v.has_value(), a.grad_next.has_value(), a.grad_hat.has_value(), !a.stopgrad_xhat,
                            cfg_euler_mode(a) == 1, a.need_uncond,         a.need_cond,          a.need_x};
  const auto [velocity_type, state_type] = cfg_euler_backward_types(a);
  dispatch_velocity_state(velocity_type, state_type, "cfg_euler_backward_cpu", [&]<typename TV, typename TX>() {
    using A = acc_t<TX>;
    cfg_euler_backward_kernel<TV, TX>(data_or_null<TV>(a.grad_v), data_or_null<TX>(a.grad_next),
                                      data_or_null<TX>(a.grad_hat), a.w.get<A>(), a.h.get<A>(),
                                      a.t.get<A>(), a.kappa.get<A>(),
                                      a.need_uncond ? du.mutable_data_ptr<TV>() : nullptr,
                                      a.need_cond ? dc.mutable_data_ptr<TV>() : nullptr,
                                      a.need_x ? dx.mutable_data_ptr<TX>() : nullptr, batch, d, flags);
  });
  return {du, dc, dx};
}

}  // namespace flowkern
