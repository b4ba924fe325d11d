// adjoint_matching_loss (M26, M28, M32) CUDA launcher: device guard, current stream, dtype dispatch, launch check.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>

#include <cmath>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "flowkern/cuda_dispatch.cuh"
#include "kernel.cuh"
#include "../cfg_euler/kernel.h"  // dispatch_velocity_state
#include "kernel.h"

namespace flowkern {
using namespace cuda;

template <>
std::tuple<at::Tensor, at::Tensor> run_adjoint_matching_loss<c10::kCUDA>(const args::AdjointMatchingLoss& args) {
  const at::Tensor &v_ft = args.v_ft, &v_base = args.v_base, &adjoint = args.adjoint;
  const bool compute_grad = args.compute_grad;
  const double lam = args.lam, p = args.p, lct = args.lct;
  const int64_t mode = adjoint_matching_mode(args);
  const c10::cuda::CUDAGuard guard(v_ft.device());
  const int64_t batch = v_ft.size(0), d = v_ft.numel() / batch, chunks = (d + kChunk - 1) / kChunk;
  const auto acc_type = v_base.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;  // acc_t<TX>
  const auto acc_options = v_ft.options().dtype(acc_type);
  at::Tensor grad = compute_grad ? at::empty(v_ft.sizes(), v_ft.options()) : at::empty({0}, v_ft.options());
  at::Tensor loss;
  if (d == 0) {  // [B, 0]: the mean over no elements is NaN; memoryless sums are 0 (no launch)
    return {at::full({}, mode == cuda::kAmMemoryless ? 0.0 : NAN, acc_options), grad};
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  // workspace: per-tile partials, per-sample sums, then two last-block counters (one memset zeroes both)
  at::Tensor work = at::empty({batch * chunks + batch + 2}, acc_options);
  loss = at::empty({}, acc_options);
  // v_ft (and the gradient) in TV, v_base and the adjoint in TX: op.cpp passes a pair velocity_state_types allows
  dispatch_velocity_state(v_ft.scalar_type(), v_base.scalar_type(), "adjoint_matching_loss_cuda",
                          [&]<typename TVa, typename TXa>() {
    using TV = cuda_t<TVa>;
    using TX = cuda_t<TXa>;
    using A = acc_t<TX>;
    const TV* vf = reinterpret_cast<const TV*>(v_ft.const_data_ptr());
    const TX* vb = reinterpret_cast<const TX*>(v_base.const_data_ptr());
    const TX* a = reinterpret_cast<const TX*>(adjoint.const_data_ptr());
    TV* g = compute_grad ? reinterpret_cast<TV*>(grad.mutable_data_ptr()) : nullptr;
    const bool vec = d % group_size<TV, TX>() == 0 && all_aligned16({vf, vb, a, g});
    A* partial = work.mutable_data_ptr<A>();
    A* sums = partial + batch * chunks;
    unsigned* counters = reinterpret_cast<unsigned*>(sums + batch);
    C10_CUDA_CHECK(cudaMemsetAsync(counters, 0, 2 * sizeof(unsigned), stream));
    A* loss_ptr = loss.mutable_data_ptr<A>();
    if (mode == cuda::kAmMemoryless) {  // (M32): s_b and the loss first, then the gradient
      const Coef<A> s = args.sigma.get<A>();
      if (chunks == 1) {  // the sample stays on chip: one launch
        auto* kernel = vec ? adjoint_matching_memoryless_fused_kernel<TV, TX, true>
                           : adjoint_matching_memoryless_fused_kernel<TV, TX, false>;
        kernel<<<batch, kThreads, 0, stream>>>(vf, vb, a, s, sums, counters, loss_ptr, g, d, A(lct), A(batch));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        auto* reduce = vec ? adjoint_matching_reduce_kernel<TV, TX, true, cuda::kAmMemoryless>
                           : adjoint_matching_reduce_kernel<TV, TX, false, cuda::kAmMemoryless>;
        reduce<<<batch * chunks, kThreads, 0, stream>>>(vf, vb, a, s, partial, counters, sums, loss_ptr, d, chunks,
                                                        batch, A(lam), A(lct));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (g != nullptr) {
          auto* kernel = vec ? adjoint_matching_memoryless_grad_kernel<TV, TX, true>
                             : adjoint_matching_memoryless_grad_kernel<TV, TX, false>;
          kernel<<<batch * chunks, kThreads, 0, stream>>>(vf, vb, a, s, sums, g, d, chunks, A(lct), A(batch));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
      return;
    }
    // elementwise / norm (M26, M28)
    const A exponent = A(mode == cuda::kAmElementwise ? 1.0 / (p - 1.0) : (2.0 - p) / (p - 1.0));
    if (mode == cuda::kAmNorm) {  // ||omega_b||^2 per sample, formed by the reduce kernel's last block
      auto* reduce =
          vec ? adjoint_matching_reduce_kernel<TV, TX, true, cuda::kAmNorm> : adjoint_matching_reduce_kernel<TV, TX, false, cuda::kAmNorm>;
      reduce<<<batch * chunks, kThreads, 0, stream>>>(vf, vb, a, Coef<A>{}, partial, counters + 1, sums, loss_ptr, d,
                                                      chunks, batch, A(lam), A(lct));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    auto* kernel = mode == cuda::kAmNorm ? (vec ? adjoint_matching_control_kernel<TV, TX, true, cuda::kAmNorm>
                                          : adjoint_matching_control_kernel<TV, TX, false, cuda::kAmNorm>)
                                   : (vec ? adjoint_matching_control_kernel<TV, TX, true, cuda::kAmElementwise>
                                          : adjoint_matching_control_kernel<TV, TX, false, cuda::kAmElementwise>);
    const A norm_floor = exponent < A(0) ? A(1e-12) : A(0);  // ||omega||^negative at omega = 0
    const A grad_scale = A(2.0 / static_cast<double>(v_ft.numel()));
    kernel<<<batch * chunks, kThreads, 0, stream>>>(vf, vb, a, sums, g, partial, counters, loss_ptr, d, chunks, A(lam),
                                                    exponent, norm_floor, grad_scale,
                                                    A(1.0 / static_cast<double>(v_ft.numel())), p == 2.0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, grad};
}

}  // namespace flowkern
