// reward_grad_clip (M8) CUDA launcher: device guard, current stream, dtype dispatch, launch check.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "flowkern/cuda_dispatch.cuh"
#include "kernel.h"
#include "kernel.cuh"

namespace flowkern {
using namespace cuda;

template <>
std::tuple<at::Tensor, at::Tensor> run_reward_grad_clip<c10::kCUDA>(const args::RewardGradClip& a) {
  const at::Tensor& grad = a.grad;
  const double tau = a.tau;
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t batch = grad.size(0), d = grad.numel() / batch, chunks = (d + kChunk - 1) / kChunk;
  const auto acc_type = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty(grad.sizes(), grad.options());
  at::Tensor norms = at::empty({batch}, grad.options().dtype(acc_type));
  // workspace (chunks > 1): the fp64 per-tile partials, the per-sample sums, then the last-block counter
  at::Tensor partial =
      chunks > 1 ? at::empty({batch * chunks + batch + 1}, grad.options().dtype(at::kDouble)) : at::Tensor();
  if (d == 0) return {out, norms.zero_()};  // [B, 0]: zero norms, no launch
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "reward_grad_clip_cuda", [&] {
    using T = cuda_t<scalar_t>;
    using A = acc_t<T>;
    const T* in = reinterpret_cast<const T*>(grad.const_data_ptr());
    T* o = reinterpret_cast<T*>(out.mutable_data_ptr());
    const bool vec = d % Pack<T>::N == 0 && aligned16(in) && aligned16(o);
    A* n = norms.mutable_data_ptr<A>();
    if (chunks == 1) {  // the sample stays on chip: one block reads it once from HBM
      auto* kernel = vec ? reward_grad_clip_fused_kernel<T, true> : reward_grad_clip_fused_kernel<T, false>;
      kernel<<<batch, kThreads, 0, stream>>>(in, o, n, d, A(tau));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    double* part = partial.mutable_data_ptr<double>();
    double* sums = part + batch * chunks;
    auto* sumsq = vec ? reward_grad_sumsq_kernel<T, true> : reward_grad_sumsq_kernel<T, false>;
    unsigned* counter = reinterpret_cast<unsigned*>(sums + batch);
    C10_CUDA_CHECK(cudaMemsetAsync(counter, 0, sizeof(unsigned), stream));
    sumsq<<<batch * chunks, kThreads, 0, stream>>>(in, part, counter, sums, n, d, chunks, batch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto* scale = vec ? reward_grad_scale_kernel<T, true> : reward_grad_scale_kernel<T, false>;
    scale<<<batch * chunks, kThreads, 0, stream>>>(in, n, o, d, chunks, A(tau));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, norms};
}

}  // namespace flowkern
