// consistency_probes (M20): argument checks, CPU/CUDA registration. Not differentiable (every input is stop-gradient
// in (M20)): its autograd kernel only checks devices, and the outputs carry no history.
#include "flowkern/op.h"
#include "kernel.h"

namespace flowkern {
namespace {
using Args = args::ConsistencyProbes;

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> consistency_probes(Args& a) {
  check_primary(a.x, "x");
  check_input(a.v_base, "v_base", a.x, "x");
  check_input(a.value_out, "value_out", a.x, "x");
  check_input(a.reward_grad, "reward_grad", a.x, "x");
  check_float("beta", a.beta, /*positive=*/true);
  eta_code(a.eta_mode);
  check_float("eps_x", a.eps_x, /*positive=*/true);
  const at::ScalarType x_type = a.x.scalar_type();
  const at::ScalarType type = common_type({&a.x, &a.v_base, &a.value_out, &a.reward_grad});
  a.t.check(a.x, acc_type(type));
  for (at::Tensor* x : {&a.x, &a.v_base, &a.value_out, &a.reward_grad}) *x = as_type(*x, type);
  auto [x_w, x_g, rho_w, rho_g] = run_consistency_probes<kDevice>(a);
  const at::ScalarType out = acc_type(x_type);  // outputs follow x even when another input is fp64
  return {to_type(x_w, out), to_type(x_g, out), to_type(rho_w, out), to_type(rho_g, out)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flowkern, m) { m.def(Args::kSchema); }
TORCH_LIBRARY_IMPL(flowkern, CPU, m) { impl<Args, &consistency_probes<c10::kCPU>>(m); }
#ifdef FLOWKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(flowkern, CUDA, m) { impl<Args, &consistency_probes<c10::kCUDA>>(m); }
#endif
TORCH_LIBRARY_IMPL(flowkern, Autograd, m) { register_autograd(m, Args::kName); }

}  // namespace flowkern
