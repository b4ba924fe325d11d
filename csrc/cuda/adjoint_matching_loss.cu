// adjoint_matching_loss (M26, M28, M32) CUDA launcher: device guard, current stream, dtype dispatch, launch check.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "adjoint_matching_loss_kernel.cuh"
#include "flowkern/cuda_dispatch.cuh"
#include "flowkern/ops/adjoint_matching_loss.h"

namespace flowkern {
namespace cuda {

std::tuple<at::Tensor, at::Tensor> adjoint_matching_loss(const at::Tensor& v_ft, const at::Tensor& v_base,
                                                         const at::Tensor& adjoint, const at::Tensor& sigma, double lam,
                                                         double p, int64_t mode, double lct, bool compute_grad) {
  const c10::cuda::CUDAGuard guard(v_ft.device());
  const int64_t batch = v_ft.size(0), d = v_ft.numel() / batch, chunks = (d + kChunk - 1) / kChunk;
  const auto acc_type = v_ft.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_options = v_ft.options().dtype(acc_type);
  at::Tensor grad = compute_grad ? at::empty(v_ft.sizes(), v_ft.options()) : at::empty({0}, v_ft.options());
  at::Tensor loss;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned sample_blocks = static_cast<unsigned>((batch + kThreads - 1) / kThreads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v_ft.scalar_type(), "adjoint_matching_loss_cuda", [&] {
    using T = cuda_t<scalar_t>;
    using A = acc_t<T>;
    const T* vf = reinterpret_cast<const T*>(v_ft.const_data_ptr());
    const T* vb = reinterpret_cast<const T*>(v_base.const_data_ptr());
    const T* a = reinterpret_cast<const T*>(adjoint.const_data_ptr());
    T* g = compute_grad ? reinterpret_cast<T*>(grad.mutable_data_ptr()) : nullptr;
    const bool vec = d % Pack<T>::N == 0 && aligned16(vf) && aligned16(vb) && aligned16(a) &&
                     (g == nullptr || aligned16(g));
    if (mode == kAmMemoryless) {  // (M32): s_b first, then the gradient
      const A* s = sigma.const_data_ptr<A>();
      at::Tensor sums = at::empty({batch}, acc_options);
      if (chunks == 1) {  // the sample stays on chip
        auto* kernel = vec ? adjoint_matching_memoryless_fused_kernel<T, true>
                           : adjoint_matching_memoryless_fused_kernel<T, false>;
        kernel<<<batch, kThreads, 0, stream>>>(vf, vb, a, s, sums.mutable_data_ptr<A>(), g, d, A(lct), A(batch));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        at::Tensor partial = at::empty({batch * chunks}, acc_options);
        auto* reduce = vec ? adjoint_matching_reduce_kernel<T, true, kAmMemoryless>
                           : adjoint_matching_reduce_kernel<T, false, kAmMemoryless>;
        reduce<<<batch * chunks, kThreads, 0, stream>>>(vf, vb, a, s, partial.mutable_data_ptr<A>(), d, chunks, A(lam));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        adjoint_matching_sample_sum_kernel<A><<<sample_blocks, kThreads, 0, stream>>>(
            partial.const_data_ptr<A>(), sums.mutable_data_ptr<A>(), batch, chunks);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (g != nullptr) {
          auto* kernel = vec ? adjoint_matching_memoryless_grad_kernel<T, true>
                             : adjoint_matching_memoryless_grad_kernel<T, false>;
          kernel<<<batch * chunks, kThreads, 0, stream>>>(vf, vb, a, s, sums.const_data_ptr<A>(), g, d, chunks, A(lct),
                                                          A(batch));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
      loss = sums.clamp_max(lct).sum().div_(static_cast<double>(batch));
      return;
    }
    // elementwise / norm (M26, M28)
    const A exponent = A(mode == kAmElementwise ? 1.0 / (p - 1.0) : (2.0 - p) / (p - 1.0));
    at::Tensor sums;
    if (mode == kAmNorm) {  // ||omega_b||^2 per sample
      at::Tensor partial = at::empty({batch * chunks}, acc_options);
      sums = at::empty({batch}, acc_options);
      auto* reduce =
          vec ? adjoint_matching_reduce_kernel<T, true, kAmNorm> : adjoint_matching_reduce_kernel<T, false, kAmNorm>;
      reduce<<<batch * chunks, kThreads, 0, stream>>>(vf, vb, a, nullptr, partial.mutable_data_ptr<A>(), d, chunks,
                                                      A(lam));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      adjoint_matching_sample_sum_kernel<A><<<sample_blocks, kThreads, 0, stream>>>(
          partial.const_data_ptr<A>(), sums.mutable_data_ptr<A>(), batch, chunks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    at::Tensor partial = at::empty({batch * chunks}, acc_options);
    auto* kernel = mode == kAmNorm ? (vec ? adjoint_matching_control_kernel<T, true, kAmNorm>
                                          : adjoint_matching_control_kernel<T, false, kAmNorm>)
                                   : (vec ? adjoint_matching_control_kernel<T, true, kAmElementwise>
                                          : adjoint_matching_control_kernel<T, false, kAmElementwise>);
    const A norm_floor = exponent < A(0) ? A(1e-12) : A(0);  // ||omega||^negative at omega = 0
    const A grad_scale = A(2.0 / static_cast<double>(v_ft.numel()));
    kernel<<<batch * chunks, kThreads, 0, stream>>>(vf, vb, a, sums.defined() ? sums.const_data_ptr<A>() : nullptr, g,
                                                    partial.mutable_data_ptr<A>(), d, chunks, A(lam), exponent,
                                                    norm_floor, grad_scale, p == 2.0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    loss = partial.sum().div_(static_cast<double>(v_ft.numel()));
  });
  return {loss, grad};
}

}  // namespace cuda
}  // namespace flowkern
