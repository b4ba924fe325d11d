// consistency_probes (M20): schema, argument checks, CPU/CUDA registration. Not differentiable (every input is
// stop-gradient in (M20)): autograd falls through and the outputs carry no history.
#include <torch/library.h>

#include <cmath>

#include "flowkern/checks.h"
#include "kernel.h"

namespace flowkern {
namespace {

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> consistency_probes(
    const at::Tensor& x, const at::Tensor& v_base, const at::Tensor& value_out, const at::Tensor& reward_grad,
    const std::optional<at::Tensor>& t, double t_value, double beta, int64_t eta_mode, double eps_x) {
  check_primary(x, "x");
  check_input(v_base, "v_base", x, "x");
  check_input(value_out, "value_out", x, "x");
  check_input(reward_grad, "reward_grad", x, "x");
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta > 0, "beta must be > 0, got ", beta);
  TORCH_CHECK_VALUE(eta_mode >= 0 && eta_mode <= 2, "eta_mode must be 0 (quad), 1 (linear) or 2 (constant)");
  TORCH_CHECK_VALUE(std::isfinite(eps_x) && eps_x > 0, "eps_x must be a positive finite float, got ", eps_x);
  const at::ScalarType type = common_type({&x, &v_base, &value_out, &reward_grad});
  const CoefArg coef_t = coef_arg("t", t, t_value, x, acc_type(type));
  auto outs = run_consistency_probes<kDevice>(as_type(x, type), as_type(v_base, type), as_type(value_out, type),
                                                 as_type(reward_grad, type), coef_t, beta, eta_mode, eps_x);
  const at::ScalarType out_type = acc_type(x.scalar_type());  // outputs follow x even when another input is fp64
  return {std::get<0>(outs).to(out_type), std::get<1>(outs).to(out_type), std::get<2>(outs).to(out_type),
          std::get<3>(outs).to(out_type)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flowkern, m) {
  m.def(
      "consistency_probes(Tensor x, Tensor v_base, Tensor value_out, Tensor reward_grad, Tensor? t, float t_value, "
      "float beta, int eta_mode, float eps_x) -> (Tensor x_w, Tensor x_G, Tensor rho_w, Tensor rho_G)");
}
TORCH_LIBRARY_IMPL(flowkern, CPU, m) { m.impl("consistency_probes", &consistency_probes<c10::kCPU>); }
#ifdef FLOWKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(flowkern, CUDA, m) { m.impl("consistency_probes", &consistency_probes<c10::kCUDA>); }
#endif
TORCH_LIBRARY_IMPL(flowkern, Autograd, m) { m.impl("consistency_probes", torch::CppFunction::makeFallthrough()); }

}  // namespace flowkern
