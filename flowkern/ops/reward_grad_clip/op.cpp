// reward_grad_clip (M8): schema, argument checks, CPU/CUDA registration. Not differentiable (the public function
// detaches its input): autograd falls through.
#include <torch/library.h>

#include <cmath>

#include "flowkern/checks.h"
#include "kernel.h"

namespace flowkern {
namespace {

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> reward_grad_clip(const at::Tensor& grad, double tau) {
  check_primary(grad, "grad");
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, "tau must be a positive finite float, got ", tau);
  return run_reward_grad_clip<kDevice>(grad.contiguous(), tau);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flowkern, m) {
  m.def("reward_grad_clip(Tensor grad, float tau) -> (Tensor ghat, Tensor norms)");
}
TORCH_LIBRARY_IMPL(flowkern, CPU, m) { m.impl("reward_grad_clip", &reward_grad_clip<c10::kCPU>); }
#ifdef FLOWKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(flowkern, CUDA, m) { m.impl("reward_grad_clip", &reward_grad_clip<c10::kCUDA>); }
#endif
TORCH_LIBRARY_IMPL(flowkern, Autograd, m) { m.impl("reward_grad_clip", torch::CppFunction::makeFallthrough()); }

}  // namespace flowkern
