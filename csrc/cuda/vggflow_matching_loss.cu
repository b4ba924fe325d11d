// vggflow_matching_loss (M16) CUDA launcher: device guard, current stream, dtype dispatch, launch check.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "flowkern/cuda_dispatch.cuh"
#include "flowkern/ops/vggflow_matching_loss.h"
#include "vggflow_matching_loss_kernel.cuh"

namespace flowkern {
namespace cuda {

std::tuple<at::Tensor, at::Tensor> vggflow_matching_loss(const at::Tensor& v_ft, const at::Tensor& v_base,
                                                         const at::Tensor& reward_grad, const at::Tensor& value_out,
                                                         const at::Tensor& t, double beta, int64_t eta_mode,
                                                         bool compute_grad) {
  const c10::cuda::CUDAGuard guard(v_ft.device());
  const int64_t batch = v_ft.size(0), d = v_ft.numel() / batch, chunks = (d + kChunk - 1) / kChunk;
  const auto acc_type = v_ft.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad = compute_grad ? at::empty(v_ft.sizes(), v_ft.options()) : at::empty({0}, v_ft.options());
  at::Tensor partial = at::empty({batch * chunks}, v_ft.options().dtype(acc_type));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v_ft.scalar_type(), "vggflow_matching_loss_cuda", [&] {
    using T = cuda_t<scalar_t>;
    using A = acc_t<T>;
    const T* p[4] = {reinterpret_cast<const T*>(v_ft.const_data_ptr()), reinterpret_cast<const T*>(v_base.const_data_ptr()),
                     reinterpret_cast<const T*>(reward_grad.const_data_ptr()),
                     reinterpret_cast<const T*>(value_out.const_data_ptr())};
    T* g = compute_grad ? reinterpret_cast<T*>(grad.mutable_data_ptr()) : nullptr;
    const bool vec = d % Pack<T>::N == 0 && aligned16(p[0]) && aligned16(p[1]) && aligned16(p[2]) && aligned16(p[3]) &&
                     (g == nullptr || aligned16(g));
    const A scale = A(2.0 / static_cast<double>(v_ft.numel()));
    auto* kernel = vec ? vggflow_matching_loss_kernel<T, true> : vggflow_matching_loss_kernel<T, false>;
    kernel<<<batch * chunks, kThreads, 0, stream>>>(p[0], p[1], p[2], p[3], t.const_data_ptr<A>(), g,
                                                     partial.mutable_data_ptr<A>(), d, chunks, A(beta),
                                                     static_cast<int>(eta_mode), scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor loss = partial.sum().div_(static_cast<double>(v_ft.numel()));
  return {loss, grad};
}

}  // namespace cuda
}  // namespace flowkern
