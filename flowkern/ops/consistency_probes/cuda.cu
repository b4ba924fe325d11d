// consistency_probes (M20) CUDA launcher: device guard, current stream, dtype dispatch, two launches, launch checks.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernel.cuh"
#include "flowkern/cuda_dispatch.cuh"
#include "kernel.h"

namespace flowkern {
using namespace cuda;

template <>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_consistency_probes<c10::kCUDA>(
    const args::ConsistencyProbes& a) {
  const at::Tensor& x = a.x;
  const int eta_mode = static_cast<int>(eta_code(a.eta_mode));
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t batch = x.size(0), d = x.numel() / batch, chunks = (d + kChunk - 1) / kChunk;
  const auto acc_options = x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor x_w = at::empty(x.sizes(), acc_options), x_g = at::empty(x.sizes(), acc_options);
  at::Tensor rho_w = at::empty({batch}, acc_options), rho_g = at::empty({batch}, acc_options);
  at::Tensor partial = at::empty({2 * batch * chunks}, acc_options);
  if (d == 0) return {x_w, x_g, rho_w.fill_(NAN), rho_g.fill_(NAN)};  // [B, 0]: rms of nothing, no launch
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "consistency_probes_cuda", [&] {
    using T = cuda_t<scalar_t>;
    using A = acc_t<T>;
    const T* xs = reinterpret_cast<const T*>(x.const_data_ptr());
    const T* vb = reinterpret_cast<const T*>(a.v_base.const_data_ptr());
    const T* c = reinterpret_cast<const T*>(a.value_out.const_data_ptr());
    const T* g = reinterpret_cast<const T*>(a.reward_grad.const_data_ptr());
    A* out_w = x_w.mutable_data_ptr<A>();
    A* out_g = x_g.mutable_data_ptr<A>();
    const bool vec = d % Pack<T>::N == 0 && aligned16(xs) && aligned16(vb) && aligned16(c) && aligned16(g) &&
                     aligned16(out_w) && aligned16(out_g);
    A* part = partial.mutable_data_ptr<A>();
    const Coef<A> tp = a.t.get<A>();
    auto* norms = vec ? consistency_probe_norms_kernel<T, true> : consistency_probe_norms_kernel<T, false>;
    norms<<<batch * chunks, kThreads, 0, stream>>>(vb, c, g, tp, part, d, chunks, A(a.beta), eta_mode);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto* write = vec ? consistency_probe_write_kernel<T, true> : consistency_probe_write_kernel<T, false>;
    write<<<batch * chunks, kThreads, 0, stream>>>(xs, vb, c, g, tp, part, out_w, out_g, rho_w.mutable_data_ptr<A>(),
                                                   rho_g.mutable_data_ptr<A>(), d, chunks, A(a.beta), eta_mode,
                                                   A(a.eps_x));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {x_w, x_g, rho_w, rho_g};
}

}  // namespace flowkern
