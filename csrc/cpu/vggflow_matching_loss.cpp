// vggflow_matching_loss (M16), C++ CPU kernel.
// One pass: per (sample, chunk) task, diff = v_ft - v_base - beta*eta_t*ghat + c_phi, partial sum of
// diff^2 and the gradient 2*diff/D written in place. Partials are summed in a fixed order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>

#include <type_traits>
#include <vector>

#include "flowkern/cpu_vec.h"
#include "flowkern/ops/vggflow_matching_loss.h"

namespace flowkern {
namespace cpu {

template <typename T>
static double matching_loss_kernel(const T* v_ft, const T* v_base, const T* ghat, const T* value_out,
                                   const acc_t<T>* t, T* grad, int64_t batch, int64_t d, double beta,
                                   int64_t eta_mode) {
  using A = acc_t<T>;
  using Vec = at::vec::Vectorized<A>;
  const int64_t chunks = num_chunks(d);
  const A grad_scale = A(2) / A(static_cast<double>(batch) * static_cast<double>(d));
  std::vector<A> partial(batch * chunks);
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(5 * kChunk);
    A* scaled = buf.data() + 4 * kChunk;  // 2*diff/D before the store (bf16/fp16 only)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, start = (task % chunks) * kChunk;
      const int64_t n = std::min(kChunk, d - start), off = b * d + start;
      const A coef = A(beta) * eta_of(t[b], eta_mode);
      const A* vf = as_acc(v_ft + off, n, buf.data());
      const A* vb = as_acc(v_base + off, n, buf.data() + kChunk);
      const A* g = as_acc(ghat + off, n, buf.data() + 2 * kChunk);
      const A* c = as_acc(value_out + off, n, buf.data() + 3 * kChunk);
      // fp32/fp64: write the gradient straight to the output; bf16/fp16: through `scaled`
      A* out = grad == nullptr ? nullptr : (std::is_same_v<T, A> ? reinterpret_cast<A*>(grad + off) : scaled);
      Vec acc(A(0));
      int64_t i = 0;
      for (; i + Vec::size() <= n; i += Vec::size()) {
        const Vec x = Vec::loadu(vf + i) - Vec::loadu(vb + i) - Vec(coef) * Vec::loadu(g + i) + Vec::loadu(c + i);
        acc = acc + x * x;
        if (out != nullptr) (x * Vec(grad_scale)).store(out + i);
      }
      A tail = 0;
      for (; i < n; ++i) {
        const A x = vf[i] - vb[i] - coef * g[i] + c[i];
        tail += x * x;
        if (out != nullptr) out[i] = x * grad_scale;
      }
      partial[task] = lane_sum(acc) + tail;
      if constexpr (!std::is_same_v<T, A>) {
        if (grad != nullptr) store_from_acc<T>(scaled, grad + off, n);
      }
    }
  });
  double total = 0;  // fixed order
  for (A p : partial) total += p;
  return total;
}

std::tuple<at::Tensor, at::Tensor> vggflow_matching_loss(const at::Tensor& v_ft, const at::Tensor& v_base,
                                                         const at::Tensor& reward_grad, const at::Tensor& value_out,
                                                         const at::Tensor& t, double beta, int64_t eta_mode,
                                                         bool compute_grad) {
  const int64_t batch = v_ft.size(0), d = v_ft.numel() / batch;
  at::Tensor grad = compute_grad ? at::empty(v_ft.sizes(), v_ft.options()) : at::empty({0}, v_ft.options());
  const auto loss_type = v_ft.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v_ft.scalar_type(), "vggflow_matching_loss_cpu", [&] {
    total = matching_loss_kernel<scalar_t>(
        v_ft.const_data_ptr<scalar_t>(), v_base.const_data_ptr<scalar_t>(), reward_grad.const_data_ptr<scalar_t>(),
        value_out.const_data_ptr<scalar_t>(), t.const_data_ptr<acc_t<scalar_t>>(),
        compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr, batch, d, beta, eta_mode);
  });
  at::Tensor loss = at::scalar_tensor(total / static_cast<double>(v_ft.numel()), v_ft.options().dtype(loss_type));
  return {loss, grad};
}

}  // namespace cpu
}  // namespace flowkern
