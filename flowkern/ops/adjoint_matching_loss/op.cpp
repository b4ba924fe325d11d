// adjoint_matching_loss (M26, M28, M32): argument checks, CPU/CUDA registration and autograd (saved gradient).
#include <cmath>

#include "flowkern/op.h"
#include "../cfg_euler/kernel.h"  // velocity_state_types
#include "kernel.h"

namespace flowkern {
namespace {
using Args = args::AdjointMatchingLoss;

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> adjoint_matching_loss(Args& a) {
  check_primary(a.v_ft, "v_ft");
  check_input(a.v_base, "v_base", a.v_ft, "v_ft");
  check_input(a.adjoint, "adjoint", a.v_ft, "v_ft");
  check_float("lam", a.lam, /*positive=*/true);
  TORCH_CHECK_VALUE(std::isfinite(a.p) && a.p > 1, "p must be a finite float > 1, got ", a.p);
  const at::ScalarType v_ft_type = a.v_ft.scalar_type();
  const at::ScalarType type = common_type({&a.v_ft, &a.v_base, &a.adjoint});
  if (adjoint_matching_mode(a) == kAmMemoryless) {
    a.sigma.check(a.v_ft, acc_type(type), /*positive=*/true);
    TORCH_CHECK_VALUE(!std::isnan(a.lct) && a.lct > 0, "lct must be > 0 (inf disables the clamp), got ", a.lct);
  }
  if constexpr (kDevice == c10::kCPU) {  // the CPU kernel reads one element type
    for (at::Tensor* x : {&a.v_ft, &a.v_base, &a.adjoint}) *x = as_type(*x, type);
  } else {  // v_ft in TV, v_base and adjoint in TX: a bf16 v_ft next to fp32 targets is read as it is
    const auto [tv, tx] = velocity_state_types(v_ft_type, common_type({&a.v_base, &a.adjoint}));
    a.v_ft = as_type(a.v_ft, tv);
    a.v_base = as_type(a.v_base, tx);
    a.adjoint = as_type(a.adjoint, tx);
  }
  auto [loss, grad] = run_adjoint_matching_loss<kDevice>(a);
  return {to_type(loss, acc_type(v_ft_type)), to_type(grad, v_ft_type)};  // empty: v_ft's dtype too
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flowkern, m) { m.def(Args::kSchema); }
TORCH_LIBRARY_IMPL(flowkern, CPU, m) { impl<Args, &adjoint_matching_loss<c10::kCPU>>(m); }
#ifdef FLOWKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(flowkern, CUDA, m) { impl<Args, &adjoint_matching_loss<c10::kCUDA>>(m); }
#endif
TORCH_LIBRARY_IMPL(flowkern, Autograd, m) {
  using I = Args::Index;
  register_autograd(m, Args::kName,
                    {.differentiable_args = {I::v_ft}, .differentiable_outputs = {0}, .saved_outputs = {1},
                     .saved_gradients = {{I::v_ft, 1}}, .grad_flag = I::compute_grad});
}

}  // namespace flowkern
