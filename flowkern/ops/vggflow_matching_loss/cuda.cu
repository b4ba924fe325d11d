// vggflow_matching_loss (M16) CUDA launcher: device guard, current stream, dtype dispatch, launch check.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "flowkern/cuda_dispatch.cuh"
#include "kernel.cuh"
#include "../cfg_euler/kernel.h"  // velocity_state_types, dispatch_velocity_state
#include "kernel.h"

namespace flowkern {
using namespace cuda;

template <>
std::tuple<at::Tensor, at::Tensor> run_vggflow_matching_loss<c10::kCUDA>(const args::VggflowMatchingLoss& a) {
  const c10::cuda::CUDAGuard guard(a.v_ft.device());
  const int64_t batch = a.v_ft.size(0), d = a.v_ft.numel() / batch, chunks = (d + kChunk - 1) / kChunk;
  const auto acc_type = a.v_base.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;  // acc_t<TX>
  const auto options = a.v_ft.options();
  at::Tensor grad = a.compute_grad ? at::empty(a.v_ft.sizes(), options) : at::empty({0}, options);
  // workspace: the per-tile partials, then the last-block counter (zeroed here: one memset, one kernel)
  at::Tensor partial = at::empty({batch * chunks + 1}, options.dtype(acc_type));
  at::Tensor loss = at::empty({}, options.dtype(acc_type));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (d == 0) return {loss.fill_(NAN), grad};  // [B, 0]: the mean over no elements, no launch (an empty grid is invalid)
  const auto [tv, tx] = velocity_state_types(a.v_ft.scalar_type(), a.v_base.scalar_type());
  dispatch_velocity_state(tv, tx, "vggflow_matching_loss_cuda", [&]<typename TVa, typename TXa>() {
    using TV = cuda_t<TVa>;
    using TX = cuda_t<TXa>;
    using A = acc_t<TX>;
    const TV* vf = reinterpret_cast<const TV*>(a.v_ft.const_data_ptr());
    const TX* p[3] = {reinterpret_cast<const TX*>(a.v_base.const_data_ptr()),
                      reinterpret_cast<const TX*>(a.reward_grad.const_data_ptr()),
                      reinterpret_cast<const TX*>(a.value_out.const_data_ptr())};
    TV* g = a.compute_grad ? reinterpret_cast<TV*>(grad.mutable_data_ptr()) : nullptr;
    const bool vec = d % group_size<TV, TX>() == 0 && all_aligned16({vf, p[0], p[1], p[2], g});
    auto* kernel = vec ? vggflow_matching_loss_kernel<TV, TX, true> : vggflow_matching_loss_kernel<TV, TX, false>;
    A* work = partial.mutable_data_ptr<A>();
    unsigned* counter = reinterpret_cast<unsigned*>(work + batch * chunks);
    C10_CUDA_CHECK(cudaMemsetAsync(counter, 0, sizeof(unsigned), stream));
    const double numel = static_cast<double>(a.v_ft.numel());
    kernel<<<batch * chunks, kThreads, 0, stream>>>(vf, p[0], p[1], p[2], a.t.get<A>(), g, work, counter,
                                                     loss.mutable_data_ptr<A>(), d, chunks, A(a.beta),
                                                     static_cast<int>(eta_code(a.eta_mode)), A(2.0 / numel),
                                                     A(1.0 / numel));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, grad};
}

}  // namespace flowkern
