// reward_grad_clip (M8): argument checks, CPU/CUDA registration. Not differentiable: its autograd kernel only checks
// devices, and the outputs carry no history.
#include "flowkern/op.h"
#include "kernel.h"

namespace flowkern {
namespace {
using Args = args::RewardGradClip;

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> reward_grad_clip(Args& a) {
  check_primary(a.grad, "grad");
  check_float("tau", a.tau, /*positive=*/true);
  a.grad = a.grad.contiguous();
  return run_reward_grad_clip<kDevice>(a);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flowkern, m) { m.def(Args::kSchema); }
TORCH_LIBRARY_IMPL(flowkern, CPU, m) { impl<Args, &reward_grad_clip<c10::kCPU>>(m); }
#ifdef FLOWKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(flowkern, CUDA, m) { impl<Args, &reward_grad_clip<c10::kCUDA>>(m); }
#endif
TORCH_LIBRARY_IMPL(flowkern, Autograd, m) { register_autograd(m, Args::kName); }

}  // namespace flowkern
