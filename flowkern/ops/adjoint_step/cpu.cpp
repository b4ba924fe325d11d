// adjoint_step (M23, M25, M31), C++ CPU kernels. Elementwise over fixed (sample, chunk) tasks, so each task reads
// its per-sample coefficients once; bf16/fp16 chunks are converted to fp32 and back (cpu_vec.h).
// Forward: JTa = (1-w) vjp_u + w vjp_c, a_new = a + h JTa | a + h(2 JTa - kappa a) (fp32), cot = [a_new; a_new].
// Backward: G = 0 + g_a + g_cot[b] + g_cot[B+b], d a = G | (1 - h kappa) G, d vjp_u = c(1-w) G, d vjp_c = c w G,
// c = h | 2h, in this order in every backend.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <vector>

#include "flowkern/cpu_vec.h"
#include "kernel.h"

namespace flowkern {
namespace cpu {
namespace {

// One element (V = A) or one Vectorized<A> lane group (V = Vectorized<A>): the same expression for both.
template <bool kCfg, bool kMemoryless, typename V>
inline V adjoint_element(V a, V vjp_u, V vjp_c, V h, V one_minus_w, V w, V kappa) {
  const V jta = kCfg ? one_minus_w * vjp_u + w * vjp_c : vjp_u;  // (M5)
  if constexpr (kMemoryless) {
    return a + h * (V(2) * jta - kappa * a);  // (M31)
  } else {
    return a + h * jta;  // (M25)
  }
}

template <typename TV, typename TX, bool kCfg, bool kMemoryless>
void adjoint_step_forward_kernel(const TX* a, const TV* vjp_u, const TV* vjp_c, Coef<acc_t<TX>> h,
                                 Coef<acc_t<TX>> w, Coef<acc_t<TX>> kappa, acc_t<TX>* a_new, TV* cot,
                                 int64_t batch, int64_t d) {
  using A = acc_t<TX>;
  using Vec = at::vec::Vectorized<A>;
  const int64_t chunks = num_chunks(d);
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    A* buf = scratch<A>(3 * kChunk);  // per-thread, reused
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, start = (task % chunks) * kChunk;
      const int64_t n = std::min(kChunk, d - start), off = b * d + start;
      const A hb = h[b], wb = kCfg ? w[b] : A(0), kb = kMemoryless ? kappa[b] : A(0);
      const A omw = A(1) - wb;
      const A* pa = as_acc(a + off, n, buf);
      const A* pu = as_acc(vjp_u + off, n, buf + kChunk);
      const A* pc = kCfg ? as_acc(vjp_c + off, n, buf + 2 * kChunk) : pu;
      A* out = a_new + off;
      int64_t i = 0;
      for (; i + Vec::size() <= n; i += Vec::size()) {
        adjoint_element<kCfg, kMemoryless, Vec>(Vec::loadu(pa + i), Vec::loadu(pu + i), Vec::loadu(pc + i), Vec(hb),
                                                Vec(omw), Vec(wb), Vec(kb))
            .store(out + i);
      }
      for (; i < n; ++i) out[i] = adjoint_element<kCfg, kMemoryless, A>(pa[i], pu[i], pc[i], hb, omw, wb, kb);
      if (cot != nullptr) {  // cotangent of the next VJP: [a_new; a_new] on the [2B] CFG batch
        store_from_acc<TV>(out, cot + off, n);
        if (kCfg) store_from_acc<TV>(out, cot + batch * d + off, n);
      }
    }
  });
}

struct BackwardFlags {
  bool has_ga, has_gcot, cfg, memoryless, need_a, need_u, need_c;
};

// out = alpha * x over n elements, stored as T.
template <typename T, typename A>
inline void store_scaled(T* out, A alpha, const A* x, int64_t n, A* buf) {
  using Vec = at::vec::Vectorized<A>;
  A* dst;
  if constexpr (std::is_same_v<T, A>) {
    dst = out;
  } else {
    dst = buf;
  }
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (Vec(alpha) * Vec::loadu(x + i)).store(dst + i);
  for (; i < n; ++i) dst[i] = alpha * x[i];
  if constexpr (!std::is_same_v<T, A>) store_from_acc<T>(buf, out, n);
}

// y = y + x over n elements.
template <typename A>
inline void add_to(A* y, const A* x, int64_t n) {
  using Vec = at::vec::Vectorized<A>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(y + i) + Vec::loadu(x + i)).store(y + i);
  for (; i < n; ++i) y[i] = y[i] + x[i];
}

template <typename TV, typename TX>
void adjoint_step_backward_kernel(const acc_t<TX>* grad_a_new, const TV* grad_cot, Coef<acc_t<TX>> h,
                                  Coef<acc_t<TX>> w, Coef<acc_t<TX>> kappa, TX* da, TV* du, TV* dc, int64_t batch,
                                  int64_t d, BackwardFlags f) {
  using A = acc_t<TX>;
  const int64_t chunks = num_chunks(d);
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    A* buf = scratch<A>(3 * kChunk);  // per-thread, reused
    A* g = buf;
    A* conv = buf + kChunk;
    A* out = buf + 2 * kChunk;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, start = (task % chunks) * kChunk;
      const int64_t n = std::min(kChunk, d - start), off = b * d + start;
      const A hb = h[b];
      const A step = f.memoryless ? A(2) * hb : hb;  // d a_new / d JTa (M25, M31)
      std::fill(g, g + n, A(0));
      if (f.has_ga) add_to(g, grad_a_new + off, n);
      if (f.has_gcot) {  // cot = [a_new; a_new]: both halves flow back into a_new
        add_to(g, as_acc(grad_cot + off, n, conv), n);
        if (f.cfg) add_to(g, as_acc(grad_cot + batch * d + off, n, conv), n);
      }
      if (f.need_a) store_scaled<TX>(da + off, f.memoryless ? A(1) - hb * kappa[b] : A(1), g, n, out);
      if (f.need_u) store_scaled<TV>(du + off, f.cfg ? step * (A(1) - w[b]) : step, g, n, out);
      if (f.need_c) store_scaled<TV>(dc + off, step * w[b], g, n, out);
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
std::tuple<at::Tensor, at::Tensor> run_adjoint_step<c10::kCPU>(const args::AdjointStep& args) {
  using namespace cpu;
  const int64_t batch = args.a.size(0), d = args.a.numel() / batch;
  const bool cfg = args.vjp_c.has_value(), memoryless = args.mode == 1;
  const auto acc_type = args.a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor a_new = at::empty(args.a.sizes(), args.a.options().dtype(acc_type));
  std::vector<int64_t> cot_shape = args.a.sizes().vec();
  cot_shape[0] *= cfg ? 2 : 1;
  const auto cot_options = args.vjp_u.options();
  at::Tensor cot = args.return_cot ? at::empty(cot_shape, cot_options) : at::empty({0}, cot_options);
  const at::ScalarType tv = args.vjp_u.scalar_type(), tx = args.a.scalar_type();
  dispatch_velocity_state(tv, tx, "adjoint_step_cpu", [&]<typename TV, typename TX>() {
    using A = acc_t<TX>;
    auto run = [&]<bool kCfg, bool kMemoryless>() {
      adjoint_step_forward_kernel<TV, TX, kCfg, kMemoryless>(
          args.a.const_data_ptr<TX>(), args.vjp_u.const_data_ptr<TV>(), data_or_null<TV>(args.vjp_c),
          args.h.get<A>(), args.w.get<A>(), args.kappa.get<A>(), a_new.mutable_data_ptr<A>(),
          args.return_cot ? cot.mutable_data_ptr<TV>() : nullptr, batch, d);
    };
    if (cfg) {
      memoryless ? run.template operator()<true, true>() : run.template operator()<true, false>();
    } else {
      memoryless ? run.template operator()<false, true>() : run.template operator()<false, false>();
    }
  });
  return {a_new, cot};
}

template <>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_adjoint_step_backward<c10::kCPU>(
    const args::AdjointStepBackward& args) {
  using namespace cpu;
  const at::Tensor& like = args.grad_a_new ? *args.grad_a_new : *args.grad_cot;
  const int64_t d = args.grad_a_new ? like.numel() / args.batch : like.numel() / (args.batch * (args.cfg ? 2 : 1));
  at::Tensor da, du, dc;
  std::tie(da, du, dc) = adjoint_step_backward_outputs(args);
  const auto [velocity_type, state_type] = adjoint_step_backward_types(args);
  const BackwardFlags flags{args.grad_a_new.has_value(), args.grad_cot.has_value(), args.cfg, args.mode == 1,
                            args.need_a, args.need_u, args.need_c};
  dispatch_velocity_state(velocity_type, state_type, "adjoint_step_backward_cpu", [&]<typename TV, typename TX>() {
    using A = acc_t<TX>;
    adjoint_step_backward_kernel<TV, TX>(data_or_null<A>(args.grad_a_new), data_or_null<TV>(args.grad_cot),
                                         args.h.get<A>(), args.w.get<A>(), args.kappa.get<A>(),
                                         args.need_a ? da.mutable_data_ptr<TX>() : nullptr,
                                         args.need_u ? du.mutable_data_ptr<TV>() : nullptr,
                                         args.need_c ? dc.mutable_data_ptr<TV>() : nullptr, args.batch, d, flags);
  });
  return {da, du, dc};
}

}  // namespace flowkern
