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
std::tuple<at::Tensor, at::Tensor> run_adjoint_step<c10::kCUDA>(const args::AdjointStep& args) {
  const c10::cuda::CUDAGuard guard(args.a.device());
  const int64_t batch = args.a.size(0), d = args.a.numel() / batch;
  const bool cfg = args.vjp_c.has_value(), memoryless = args.mode == 1;
  const auto acc_type = args.a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor a_new = at::empty(args.a.sizes(), args.a.options().dtype(acc_type));
  std::vector<int64_t> cot_shape = args.a.sizes().vec();
  cot_shape[0] *= cfg ? 2 : 1;
  const auto cot_options = args.vjp_u.options();
  at::Tensor cot = args.return_cot ? at::empty(cot_shape, cot_options) : at::empty({0}, cot_options);
  if (d == 0) return {a_new, cot};
  const dim3 grid = tiled_grid(batch, d, kStepTile);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType tv = args.vjp_u.scalar_type(), tx = args.a.scalar_type();
  dispatch_velocity_state(tv, tx, "adjoint_step_cuda", [&]<typename TVa, typename TXa>() {
    using TV = cuda_t<TVa>;
    using TX = cuda_t<TXa>;
    using A = acc_t<TX>;
    const TX* ap = reinterpret_cast<const TX*>(args.a.const_data_ptr());
    const TV* up = reinterpret_cast<const TV*>(args.vjp_u.const_data_ptr());
    const TV* cp = opt_ptr<const TV>(args.vjp_c);
    A* out = a_new.mutable_data_ptr<A>();
    TV* cot_ptr = args.return_cot ? reinterpret_cast<TV*>(cot.mutable_data_ptr()) : nullptr;
    const bool vec = d % group_size<TV, TX, A>() == 0 && all_aligned16({ap, up, cp, out, cot_ptr});
    auto launch = [&]<bool kCfg, bool kMemoryless>() {
      auto* kernel = vec ? adjoint_step_kernel<TV, TX, kCfg, kMemoryless, true>
                         : adjoint_step_kernel<TV, TX, kCfg, kMemoryless, false>;
      kernel<<<grid, kThreads, 0, stream>>>(ap, up, cp, args.h.get<A>(), args.w.get<A>(),
                                            args.kappa.get<A>(), out, cot_ptr, d, batch * d);
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
    const args::AdjointStepBackward& args) {
  const at::Tensor& like = args.grad_a_new ? *args.grad_a_new : *args.grad_cot;
  const c10::cuda::CUDAGuard guard(like.device());
  const int64_t d = args.grad_a_new ? like.numel() / args.batch : like.numel() / (args.batch * (args.cfg ? 2 : 1));
  at::Tensor da, du, dc;
  std::tie(da, du, dc) = adjoint_step_backward_outputs(args);
  const auto [velocity_type, state_type] = adjoint_step_backward_types(args);
  if (d == 0 || !(args.need_a || args.need_u || args.need_c)) return {da, du, dc};
  const AdjointStepBackwardFlags flags{args.grad_a_new.has_value(), args.grad_cot.has_value(), args.cfg,
                                       args.mode == 1, args.need_a, args.need_u, args.need_c};
  const dim3 grid = tiled_grid(args.batch, d, kStepTile);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_velocity_state(velocity_type, state_type, "adjoint_step_backward_cuda", [&]<typename TVa, typename TXa>() {
    using TV = cuda_t<TVa>;
    using TX = cuda_t<TXa>;
    using A = acc_t<TX>;
    const A* ga = opt_ptr<const A>(args.grad_a_new);
    const TV* gc = opt_ptr<const TV>(args.grad_cot);
    TX* da_ptr = args.need_a ? reinterpret_cast<TX*>(da.mutable_data_ptr()) : nullptr;
    TV* du_ptr = args.need_u ? reinterpret_cast<TV*>(du.mutable_data_ptr()) : nullptr;
    TV* dc_ptr = args.need_c ? reinterpret_cast<TV*>(dc.mutable_data_ptr()) : nullptr;
    const bool vec = d % group_size<TV, TX, A>() == 0 && all_aligned16({ga, gc, da_ptr, du_ptr, dc_ptr});
    auto* kernel = vec ? adjoint_step_backward_kernel<TV, TX, true> : adjoint_step_backward_kernel<TV, TX, false>;
    kernel<<<grid, kThreads, 0, stream>>>(ga, gc, args.h.get<A>(), args.w.get<A>(), args.kappa.get<A>(),
                                          da_ptr, du_ptr, dc_ptr, d, args.batch * d, flags);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {da, du, dc};
}

}  // namespace flowkern
