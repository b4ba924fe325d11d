// adjoint_matching_loss (M26, M28, M32): schema, argument checks, CPU/CUDA registration and autograd (saved gradient).
#include <torch/library.h>

#include <cmath>

#include "flowkern/autograd.h"
#include "flowkern/checks.h"
#include "kernel.h"

namespace flowkern {
namespace {

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> adjoint_matching_loss(const at::Tensor& v_ft, const at::Tensor& v_base,
                                                         const at::Tensor& adjoint, const std::optional<at::Tensor>& sigma,
                                                         double sigma_value, double lam, double p, int64_t mode,
                                                         double lct, bool compute_grad) {
  check_primary(v_ft, "v_ft");
  check_input(v_base, "v_base", v_ft, "v_ft");
  check_input(adjoint, "adjoint", v_ft, "v_ft");
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "mode must be 0 (elementwise), 1 (norm) or 2 (memoryless), got ", mode);
  TORCH_CHECK_VALUE(std::isfinite(lam) && lam > 0, "lam must be a positive finite float, got ", lam);
  TORCH_CHECK_VALUE(std::isfinite(p) && p > 1, "p must be a finite float > 1, got ", p);
  const at::ScalarType type = common_type({&v_ft, &v_base, &adjoint});
  CoefArg coef_sigma;
  if (mode == 2) {
    coef_sigma = coef_arg("sigma", sigma, sigma_value, v_ft, acc_type(type), /*positive=*/true);
    TORCH_CHECK_VALUE(!std::isnan(lct) && lct > 0, "lct must be > 0 (inf disables the clamp), got ", lct);
  }
  if (mode == 1 && p == 2.0) mode = 0;  // ||omega||^0 = 1: u* = -omega, no norm pass
  auto [loss, grad] = run_adjoint_matching_loss<kDevice>(as_type(v_ft, type), as_type(v_base, type),
                                                            as_type(adjoint, type), coef_sigma, lam, p, mode, lct,
                                                            compute_grad);
  return {to_type(loss, acc_type(v_ft.scalar_type())), to_type(grad, v_ft.scalar_type())};  // empty: v_ft's dtype too
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flowkern, m) {
  m.def(
      "adjoint_matching_loss(Tensor v_ft, Tensor v_base, Tensor adjoint, Tensor? sigma, float sigma_value, float lam, "
      "float p, int mode, float lct, bool compute_grad) -> (Tensor loss, Tensor grad)");
}
TORCH_LIBRARY_IMPL(flowkern, CPU, m) { m.impl("adjoint_matching_loss", &adjoint_matching_loss<c10::kCPU>); }
#ifdef FLOWKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(flowkern, CUDA, m) { m.impl("adjoint_matching_loss", &adjoint_matching_loss<c10::kCUDA>); }
#endif
TORCH_LIBRARY_IMPL(flowkern, Autograd, m) {
  register_autograd(m, "adjoint_matching_loss",
                    {.differentiable_args = {0}, .differentiable_outputs = {0}, .saved_outputs = {1},
                     .saved_gradients = {{0, 1}}});
}

}  // namespace flowkern
