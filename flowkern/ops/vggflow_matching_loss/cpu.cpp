// vggflow_matching_loss (M16), C++ CPU kernel. One pass: per (sample, chunk) task, diff = v_ft - v_base -
// beta*eta_t*ghat + c_phi in sub-blocks of kSub elements (converted in L1 where an input is not A), partial sum of
// diff^2 and the gradient 2*diff/D written in the same pass. Inputs may differ in dtype (no cast copy: a bf16 v_ft
// next to fp32 targets is read as it is). Partials are summed in a fixed order.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "flowkern/cpu_vec.h"
#include "kernel.h"

namespace flowkern {
namespace cpu {

template <typename A>
static double matching_loss_kernel(Input v_ft, Input v_base, Input ghat, Input value_out, Coef<A> t, Output grad,
                                   bool compute_grad, int64_t batch, int64_t d, double beta, int64_t eta_mode) {
  using Vec = at::vec::Vectorized<A>;
  const int64_t chunks = num_chunks(d);
  const A grad_scale = A(2) / A(static_cast<double>(batch) * static_cast<double>(d));
  A* partial = partial_sums<A>(batch * chunks);
  parallel_tasks(batch * chunks, std::min(d, kChunk), [&](int64_t begin, int64_t end) {
    alignas(64) A buf[5][kSub];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, start = (task % chunks) * kChunk, n_task = std::min(kChunk, d - start);
      const A coef = A(beta) * eta_of(t[b], eta_mode);
      Vec acc(A(0));
      A tail = 0;
      for (int64_t s = 0; s < n_task; s += kSub) {
        const int64_t n = std::min(kSub, n_task - s), off = b * d + start + s;
        const A* vf = load(v_ft, off, n, buf[0]);
        const A* vb = load(v_base, off, n, buf[1]);
        const A* g = load(ghat, off, n, buf[2]);
        const A* c = load(value_out, off, n, buf[3]);
        A* out = compute_grad ? grad.target(off, buf[4]) : nullptr;
        int64_t i = 0;
        for (; i + Vec::size() <= n; i += Vec::size()) {
          const Vec x = Vec::loadu(vf + i) - Vec::loadu(vb + i) - Vec(coef) * Vec::loadu(g + i) + Vec::loadu(c + i);
          acc = acc + x * x;
          if (out != nullptr) (x * Vec(grad_scale)).store(out + i);
        }
        for (; i < n; ++i) {  // kSub % Vec::size() == 0: only the last sub-block has a tail
          const A x = vf[i] - vb[i] - coef * g[i] + c[i];
          tail += x * x;
          if (out != nullptr) out[i] = x * grad_scale;
        }
        if (out != nullptr) grad.store(off, n, out);
      }
      partial[task] = lane_sum(acc) + tail;
    }
  });
  double total = 0;  // fixed order
  for (int64_t task = 0; task < batch * chunks; ++task) total += partial[task];
  return total;
}

}  // namespace cpu

template <>
std::tuple<at::Tensor, at::Tensor> run_vggflow_matching_loss<c10::kCPU>(const args::VggflowMatchingLoss& a) {
  using cpu::Input;
  const at::Tensor& v_ft = a.v_ft;
  const int64_t batch = v_ft.size(0), d = v_ft.numel() / batch;
  at::Tensor grad = a.compute_grad ? at::empty(v_ft.sizes(), v_ft.options()) : at::empty({0}, v_ft.options());
  const bool fp64 = common_type({&v_ft, &a.v_base, &a.reward_grad, &a.value_out}) == at::kDouble;
  const auto input = [](const at::Tensor& x) { return Input{x.const_data_ptr(), x.scalar_type()}; };
  const cpu::Output out{a.compute_grad ? grad.mutable_data_ptr() : nullptr, v_ft.scalar_type()};
  const int64_t eta = eta_code(a.eta_mode);
  const double total =
      fp64 ? cpu::matching_loss_kernel<double>(input(v_ft), input(a.v_base), input(a.reward_grad),
                                               input(a.value_out), a.t.get<double>(), out, a.compute_grad, batch, d,
                                               a.beta, eta)
           : cpu::matching_loss_kernel<float>(input(v_ft), input(a.v_base), input(a.reward_grad), input(a.value_out),
                                              a.t.get<float>(), out, a.compute_grad, batch, d, a.beta, eta);
  return {cpu::scalar_output(total / static_cast<double>(v_ft.numel()), v_ft.options().dtype(fp64 ? at::kDouble : at::kFloat)),
          grad};
}

}  // namespace flowkern
