// adjoint_step (M23, M25, M31) CUDA launchers: device guard, current stream, (velocity, state) dtype dispatch,
// 16-byte or scalar path, launch check.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "flowkern/cuda_dispatch.cuh"
#include "kernel.cuh"
#include "kernel.h"

namespace flowkern {
using namespace cuda;

template <>
std::tuple<at::Tensor, at::Tensor> run_adjoint_step<c10::kCUDA>(const at::Tensor& a, const at::Tensor& vjp_u,
                                                               const std::optional<at::Tensor>& vjp_c,
                                                               const CoefArg& h, const CoefArg& w,
                                                               const CoefArg& kappa, int64_t mode, bool return_cot) {
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t batch = a.size(0), d = a.numel() / batch;
  const bool cfg = vjp_c.has_value(), memoryless = mode == 1;
  const auto acc_type = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor a_new = at::empty(a.sizes(), a.options().dtype(acc_type));
  std::vector<int64_t> cot_shape = a.sizes().vec();
  cot_shape[0] *= cfg ? 2 : 1;
  at::Tensor cot = return_cot ? at::empty(cot_shape, vjp_u.options()) : at::empty({0}, vjp_u.options());
  if (d == 0) return {a_new, cot};
  const dim3 grid = tiled_grid(batch, d, kStepTile);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_velocity_state(vjp_u.scalar_type(), a.scalar_type(), "adjoint_step_cuda", [&]<typename TVa, typename TXa>() {
    using TV = cuda_t<TVa>;
    using TX = cuda_t<TXa>;
    using A = acc_t<TX>;
    const TX* ap = reinterpret_cast<const TX*>(a.const_data_ptr());
    const TV* up = reinterpret_cast<const TV*>(vjp_u.const_data_ptr());
    const TV* cp = opt_ptr<const TV>(vjp_c);
    A* out = a_new.mutable_data_ptr<A>();
    TV* cot_ptr = return_cot ? reinterpret_cast<TV*>(cot.mutable_data_ptr()) : nullptr;
    const bool vec = d % group_size<TV, TX, A>() == 0 && all_aligned16({ap, up, cp, out, cot_ptr});
    auto launch = [&]<bool kCfg, bool kMemoryless>() {
      auto* kernel = vec ? adjoint_step_kernel<TV, TX, kCfg, kMemoryless, true>
                         : adjoint_step_kernel<TV, TX, kCfg, kMemoryless, false>;
      kernel<<<grid, kThreads, 0, stream>>>(ap, up, cp, h.get<A>(), w.get<A>(),
                                            kappa.get<A>(), out, cot_ptr, d, batch * d);
    };
    if (cfg) {
      memoryless ? launch.template operator()<true, true>() : launch.template operator()<true, false>();
    } else {
      memoryless ? launch.template operator()<false, true>() : launch.template operator()<false, false>();
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {a_new, cot};
}

template <>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_adjoint_step_backward<c10::kCUDA>(
    const std::optional<at::Tensor>& grad_a_new, const std::optional<at::Tensor>& grad_cot, int64_t batch,
    const CoefArg& h, const CoefArg& w, const CoefArg& kappa, int64_t mode, bool cfg, bool need_a, bool need_u,
    bool need_c, at::ScalarType velocity_type, at::ScalarType state_type) {
  const at::Tensor& like = grad_a_new ? *grad_a_new : *grad_cot;
  const c10::cuda::CUDAGuard guard(like.device());
  const int64_t d = grad_a_new ? like.numel() / batch : like.numel() / (batch * (cfg ? 2 : 1));
  std::vector<int64_t> shape = like.sizes().vec();
  shape[0] = batch;
  auto out = [&](bool need, at::ScalarType type) {
    return need ? at::empty(shape, like.options().dtype(type)) : at::empty({0}, like.options().dtype(type));
  };
  at::Tensor da = out(need_a, state_type), du = out(need_u, velocity_type), dc = out(need_c, velocity_type);
  if (d == 0 || !(need_a || need_u || need_c)) return {da, du, dc};
  const AdjointStepBackwardFlags flags{grad_a_new.has_value(), grad_cot.has_value(), cfg, mode == 1,
                                       need_a,                 need_u,               need_c};
  const dim3 grid = tiled_grid(batch, d, kStepTile);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_velocity_state(velocity_type, state_type, "adjoint_step_backward_cuda", [&]<typename TVa, typename TXa>() {
    using TV = cuda_t<TVa>;
    using TX = cuda_t<TXa>;
    using A = acc_t<TX>;
    const A* ga = opt_ptr<const A>(grad_a_new);
    const TV* gc = opt_ptr<const TV>(grad_cot);
    TX* da_ptr = need_a ? reinterpret_cast<TX*>(da.mutable_data_ptr()) : nullptr;
    TV* du_ptr = need_u ? reinterpret_cast<TV*>(du.mutable_data_ptr()) : nullptr;
    TV* dc_ptr = need_c ? reinterpret_cast<TV*>(dc.mutable_data_ptr()) : nullptr;
    const bool vec = d % group_size<TV, TX, A>() == 0 && all_aligned16({ga, gc, da_ptr, du_ptr, dc_ptr});
    auto* kernel = vec ? adjoint_step_backward_kernel<TV, TX, true> : adjoint_step_backward_kernel<TV, TX, false>;
    kernel<<<grid, kThreads, 0, stream>>>(ga, gc, h.get<A>(), w.get<A>(), kappa.get<A>(),
                                          da_ptr, du_ptr, dc_ptr, d, batch * d, flags);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {da, du, dc};
}

}  // namespace flowkern
