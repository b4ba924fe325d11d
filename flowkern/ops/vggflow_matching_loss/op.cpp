// vggflow_matching_loss (M16): schema, argument checks, CPU/CUDA registration and autograd (saved gradient).
#include <torch/library.h>

#include "flowkern/autograd.h"
#include "flowkern/checks.h"
#include "../cfg_euler/kernel.h"  // velocity_state_types
#include "kernel.h"

namespace flowkern {
namespace {

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> vggflow_matching_loss(const at::Tensor& v_ft, const at::Tensor& v_base,
                                                         const at::Tensor& reward_grad, const at::Tensor& value_out,
                                                         const std::optional<at::Tensor>& t, double t_value,
                                                         double beta, int64_t eta_mode, bool compute_grad) {
  check_primary(v_ft, "v_ft");
  check_input(v_base, "v_base", v_ft, "v_ft");
  check_input(reward_grad, "reward_grad", v_ft, "v_ft");
  check_input(value_out, "value_out", v_ft, "v_ft");
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta > 0, "beta must be > 0, got ", beta);
  TORCH_CHECK_VALUE(eta_mode >= 0 && eta_mode <= 2, "eta_mode must be 0 (quad), 1 (linear) or 2 (constant)");
  const CoefArg coef_t =
      coef_arg("t", t, t_value, v_ft, acc_type(common_type({&v_ft, &v_base, &reward_grad, &value_out})));
  // The CPU kernel reads each input in its own dtype. The CUDA kernel takes v_ft in TV and the targets in TX, a pair
  // that velocity_state_types allows (a bf16 v_ft next to fp32 targets is read as it is); others are cast.
  const auto [tv, tx] = velocity_state_types(v_ft.scalar_type(), common_type({&v_base, &reward_grad, &value_out}));
  const auto input = [&](const at::Tensor& x, at::ScalarType type) {
    return kDevice == c10::kCPU ? x.contiguous() : as_type(x, type);
  };
  auto [loss, grad] = run_vggflow_matching_loss<kDevice>(input(v_ft, tv), input(v_base, tx), input(reward_grad, tx),
                                                            input(value_out, tx), coef_t, beta, eta_mode,
                                                            compute_grad);
  return {to_type(loss, acc_type(v_ft.scalar_type())), to_type(grad, v_ft.scalar_type())};  // empty: v_ft's dtype too
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flowkern, m) {
  m.def(
      "vggflow_matching_loss(Tensor v_ft, Tensor v_base, Tensor reward_grad, Tensor value_out, Tensor? t, "
      "float t_value, float beta, int eta_mode, bool compute_grad) -> (Tensor loss, Tensor grad)");
}
TORCH_LIBRARY_IMPL(flowkern, CPU, m) { m.impl("vggflow_matching_loss", &vggflow_matching_loss<c10::kCPU>); }
#ifdef FLOWKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(flowkern, CUDA, m) { m.impl("vggflow_matching_loss", &vggflow_matching_loss<c10::kCUDA>); }
#endif
TORCH_LIBRARY_IMPL(flowkern, Autograd, m) {
  register_autograd(m, "vggflow_matching_loss",
                    {.differentiable_args = {0}, .differentiable_outputs = {0}, .saved_outputs = {1},
                     .saved_gradients = {{0, 1}}});
}

}  // namespace flowkern
