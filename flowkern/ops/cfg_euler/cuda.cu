// cfg_euler (M5, M2, M6, M30) CUDA launchers: device guard, current stream, (velocity, state) dtype dispatch,
// 16-byte or scalar path, launch check.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernel.cuh"
#include "flowkern/cuda_dispatch.cuh"
#include "kernel.h"

namespace flowkern {
using namespace cuda;

template <>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_cfg_euler<c10::kCUDA>(const args::CfgEuler& a) {
  const std::optional<at::Tensor>&v_uncond = a.v_uncond, &noise = a.noise;
  const at::Tensor &v_cond = a.v_cond, &x = a.x;
  const CoefArg &w = a.w, &h = a.h, &t = a.t, &kappa = a.kappa, &sigma = a.sigma;
  const int64_t mode = cfg_euler_mode(a);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t batch = x.size(0), d = x.numel() / batch;
  at::Tensor v = at::empty(v_cond.sizes(), v_cond.options());
  at::Tensor x_next = at::empty(x.sizes(), x.options()), x_hat = at::empty(x.sizes(), x.options());
  if (d == 0) return {v, x_next, x_hat};
  const bool cfg = v_uncond.has_value(), memoryless = mode == 1;
  const dim3 grid = tiled_grid(batch, d, kStepTile);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_velocity_state(v_cond.scalar_type(), x.scalar_type(), "cfg_euler_cuda", [&]<typename TVa, typename TXa>() {
    using TV = cuda_t<TVa>;
    using TX = cuda_t<TXa>;
    using A = acc_t<TX>;
    const TV* vu = opt_ptr<const TV>(v_uncond);
    const TV* vc = reinterpret_cast<const TV*>(v_cond.const_data_ptr());
    const TX* xs = reinterpret_cast<const TX*>(x.const_data_ptr());
    const TX* xi = opt_ptr<const TX>(noise);
    TV* v_out = reinterpret_cast<TV*>(v.mutable_data_ptr());
    TX* next_out = reinterpret_cast<TX*>(x_next.mutable_data_ptr());
    TX* hat_out = reinterpret_cast<TX*>(x_hat.mutable_data_ptr());
    const bool vec = d % group_size<TV, TX>() == 0 && all_aligned16({vu, vc, xs, xi, v_out, next_out, hat_out});
    auto launch = [&]<bool kCfg, bool kMemoryless>() {
      auto* kernel = vec ? cfg_euler_kernel<TV, TX, kCfg, kMemoryless, true>
                         : cfg_euler_kernel<TV, TX, kCfg, kMemoryless, false>;
      kernel<<<grid, kThreads, 0, stream>>>(vu, vc, xs, xi, w.get<A>(), h.get<A>(),
                                            t.get<A>(), kappa.get<A>(), sigma.get<A>(),
                                            v_out, next_out, hat_out, d);
    };
    if (cfg) {
      memoryless ? launch.template operator()<true, true>() : launch.template operator()<true, false>();
    } else {
      memoryless ? launch.template operator()<false, true>() : launch.template operator()<false, false>();
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {v, x_next, x_hat};
}

template <>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_cfg_euler_backward<c10::kCUDA>(
    const args::CfgEulerBackward& a) {
  const at::Tensor& like = cfg_euler_backward_like(a);
  const c10::cuda::CUDAGuard guard(like.device());
  const int64_t batch = like.size(0), d = like.numel() / batch;
  at::Tensor du, dc, dx;
  std::tie(du, dc, dx) = cfg_euler_backward_outputs(a);
  if (d == 0 || !(a.need_uncond || a.need_cond || a.need_x)) return {du, dc, dx};
  const CfgEulerBackwardFlags flags{a.grad_v.has_value(), a.grad_next.has_value(), a.grad_hat.has_value(),
                                    !a.stopgrad_xhat,     cfg_euler_mode(a) == 1,  a.need_uncond,
                                    a.need_cond,          a.need_x};
  const auto [velocity_type, state_type] = cfg_euler_backward_types(a);
  const dim3 grid = tiled_grid(batch, d, kStepTile);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_velocity_state(velocity_type, state_type, "cfg_euler_backward_cuda", [&]<typename TVa, typename TXa>() {
    using TV = cuda_t<TVa>;
    using TX = cuda_t<TXa>;
    using A = acc_t<TX>;
    const TV* gv = opt_ptr<const TV>(a.grad_v);
    const TX* gn = opt_ptr<const TX>(a.grad_next);
    const TX* gh = opt_ptr<const TX>(a.grad_hat);
    TV* du_ptr = a.need_uncond ? reinterpret_cast<TV*>(du.mutable_data_ptr()) : nullptr;
    TV* dc_ptr = a.need_cond ? reinterpret_cast<TV*>(dc.mutable_data_ptr()) : nullptr;
    TX* dx_ptr = a.need_x ? reinterpret_cast<TX*>(dx.mutable_data_ptr()) : nullptr;
    const bool vec = d % group_size<TV, TX>() == 0 && all_aligned16({gv, gn, gh, du_ptr, dc_ptr, dx_ptr});
    auto* kernel = vec ? cfg_euler_backward_kernel<TV, TX, true> : cfg_euler_backward_kernel<TV, TX, false>;
    kernel<<<grid, kThreads, 0, stream>>>(gv, gn, gh, a.w.get<A>(), a.h.get<A>(), a.t.get<A>(), a.kappa.get<A>(),
                                          du_ptr, dc_ptr, dx_ptr, d, flags);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {du, dc, dx};
}

}  // namespace flowkern
