// consistency_probes (M20), C++ CPU kernel. Two passes, since the per-sample rms gates the elementwise pass:
//   1. per (sample, chunk) task: partial sums of w^2 and G^2, G = c_phi - beta*eta_t*ghat (M15), w = v_base - G;
//   then per sample, chunks summed in a fixed order: rho = max(sqrt(sum/D_b), 1e-12);
//   2. per task: x_w = x + (eps_x/rho_w) w, x_G = x + (eps_x/rho_G) G, written in fp32 (fp64 for fp64 inputs).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "flowkern/cpu_vec.h"
#include "kernel.h"

namespace flowkern {
namespace cpu {
namespace {
constexpr double kRmsFloor = 1e-12;  // rms_b floor of (M20)

template <typename T>
void probes_kernel(const T* x, const T* v_base, const T* value_out, const T* ghat, Coef<acc_t<T>> t, acc_t<T>* x_w,
                   acc_t<T>* x_g, acc_t<T>* rho_w, acc_t<T>* rho_g, int64_t batch, int64_t d, double beta,
                   int64_t eta_mode, double eps_x) {
  using A = acc_t<T>;
  using Vec = at::vec::Vectorized<A>;
  const int64_t chunks = num_chunks(d);
  std::vector<A> partial(2 * batch * chunks);
  // pass 1: sums of w^2 and G^2 per (sample, chunk)
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    A* buf = scratch<A>(3 * kSub);  // per-thread, reused
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, start = (task % chunks) * kChunk, n = std::min(kChunk, d - start);
      const A coef = A(beta) * eta_of(t[b], eta_mode);
      Vec acc_w(A(0)), acc_g(A(0));
      A tail_w = 0, tail_g = 0;
      for (int64_t s = 0; s < n; s += kSub) {
        const int64_t m = std::min(kSub, n - s), off = b * d + start + s;
        const A* vb = as_acc(v_base + off, m, buf);
        const A* c = as_acc(value_out + off, m, buf + kSub);
        const A* g = as_acc(ghat + off, m, buf + 2 * kSub);
        int64_t i = 0;
        for (; i + Vec::size() <= m; i += Vec::size()) {
          const Vec gv = Vec::loadu(c + i) - Vec(coef) * Vec::loadu(g + i);
          const Vec w = Vec::loadu(vb + i) - gv;
          acc_w = acc_w + w * w;
          acc_g = acc_g + gv * gv;
        }
        for (; i < m; ++i) {  // kSub % Vec::size() == 0: only the last sub-block has a tail
          const A gv = c[i] - coef * g[i], w = vb[i] - gv;
          tail_w += w * w;
          tail_g += gv * gv;
        }
      }
      partial[2 * task] = lane_sum(acc_w) + tail_w;
      partial[2 * task + 1] = lane_sum(acc_g) + tail_g;
    }
  });
  for (int64_t b = 0; b < batch; ++b) {  // fixed order: deterministic and batch-invariant
    A sum_w = 0, sum_g = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      sum_w += partial[2 * (b * chunks + k)];
      sum_g += partial[2 * (b * chunks + k) + 1];
    }
    rho_w[b] = std::max(std::sqrt(sum_w / A(d)), A(kRmsFloor));
    rho_g[b] = std::max(std::sqrt(sum_g / A(d)), A(kRmsFloor));
  }
  // pass 2: the probes
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    A* buf = scratch<A>(4 * kSub);  // per-thread, reused
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, start = (task % chunks) * kChunk, n = std::min(kChunk, d - start);
      const A coef = A(beta) * eta_of(t[b], eta_mode);
      const A step_w = A(eps_x) / rho_w[b], step_g = A(eps_x) / rho_g[b];
      for (int64_t s = 0; s < n; s += kSub) {
        const int64_t m = std::min(kSub, n - s), off = b * d + start + s;
        const A* xs = as_acc(x + off, m, buf);
        const A* vb = as_acc(v_base + off, m, buf + kSub);
        const A* c = as_acc(value_out + off, m, buf + 2 * kSub);
        const A* g = as_acc(ghat + off, m, buf + 3 * kSub);
        A* out_w = x_w + off;
        A* out_g = x_g + off;
        int64_t i = 0;
        for (; i + Vec::size() <= m; i += Vec::size()) {
          const Vec gv = Vec::loadu(c + i) - Vec(coef) * Vec::loadu(g + i);
          const Vec w = Vec::loadu(vb + i) - gv;
          const Vec xv = Vec::loadu(xs + i);
          (xv + Vec(step_w) * w).store(out_w + i);
          (xv + Vec(step_g) * gv).store(out_g + i);
        }
        for (; i < m; ++i) {
          const A gv = c[i] - coef * g[i], w = vb[i] - gv;
          out_w[i] = xs[i] + step_w * w;
          out_g[i] = xs[i] + step_g * gv;
        }
      }
    }
  });
}

}  // namespace

}  // namespace cpu

template <>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_consistency_probes<c10::kCPU>(
    const args::ConsistencyProbes& a) {
  using namespace cpu;
  const at::Tensor& x = a.x;
  const int64_t batch = x.size(0), d = x.numel() / batch;
  const auto out_options = x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor x_w = at::empty(x.sizes(), out_options), x_g = at::empty(x.sizes(), out_options);
  at::Tensor rho_w = at::empty({batch}, out_options), rho_g = at::empty({batch}, out_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "consistency_probes_cpu", [&] {
    using A = acc_t<scalar_t>;
    probes_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), a.v_base.const_data_ptr<scalar_t>(),
                            a.value_out.const_data_ptr<scalar_t>(), a.reward_grad.const_data_ptr<scalar_t>(),
                            a.t.get<A>(), x_w.mutable_data_ptr<A>(), x_g.mutable_data_ptr<A>(),
                            rho_w.mutable_data_ptr<A>(), rho_g.mutable_data_ptr<A>(), batch, d, a.beta,
                            eta_code(a.eta_mode), a.eps_x);
  });
  return {x_w, x_g, rho_w, rho_g};
}

}  // namespace flowkern
