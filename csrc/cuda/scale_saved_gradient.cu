// The backward of a loss that saved its gradient in the forward (csrc/autograd.cpp): x *= *grad_loss in place, read
// on the device (no host sync), and skipped by every block when the cotangent is 1 (loss.backward()): the saved
// gradient is then the answer with no memory traffic at all, so forward + backward of vggflow_matching_loss moves 5D.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "flowkern/cuda_dispatch.cuh"

namespace flowkern {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads)
    scale_in_place_kernel(T* __restrict__ x, const acc_t<T>* __restrict__ scale, int64_t n) {
  using A = acc_t<T>;
  const A s = *scale;
  if (s == A(1)) return;  // uniform across the grid: no block touches x
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    x[i] = from_acc<T>(to_acc(x[i]) * s);
  }
}

}  // namespace

void scale_saved_gradient_in_place(at::Tensor& x, const at::Tensor& grad_loss) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.is_contiguous(), "the saved gradient must be contiguous");
  const int64_t n = x.numel();
  if (n == 0) return;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor scale = grad_loss.scalar_type() == acc ? grad_loss : grad_loss.to(acc);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65536));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "scale_saved_gradient_cuda", [&] {
    using T = cuda_t<scalar_t>;
    scale_in_place_kernel<T><<<blocks, kThreads, 0, stream>>>(reinterpret_cast<T*>(x.mutable_data_ptr()),
                                                              scale.const_data_ptr<acc_t<T>>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace flowkern
