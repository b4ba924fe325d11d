// vggflow_matching_loss (M16): argument checks, CPU/CUDA registration and autograd (saved gradient).
#include "flowkern/op.h"
#include "../cfg_euler/kernel.h"  // velocity_state_types
#include "kernel.h"

namespace flowkern {
namespace {
using Args = args::VggflowMatchingLoss;

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> vggflow_matching_loss(Args& a) {
  check_primary(a.v_ft, "v_ft");
  check_input(a.v_base, "v_base", a.v_ft, "v_ft");
  check_input(a.reward_grad, "reward_grad", a.v_ft, "v_ft");
  check_input(a.value_out, "value_out", a.v_ft, "v_ft");
  check_float("beta", a.beta, /*positive=*/true);
  eta_code(a.eta_mode);
  const at::ScalarType v_ft_type = a.v_ft.scalar_type();
  a.t.check(a.v_ft, acc_type(common_type({&a.v_ft, &a.v_base, &a.reward_grad, &a.value_out})));
  // The CPU kernel reads each input in its own dtype. The CUDA kernel takes v_ft in TV and the targets in TX, a pair
  // that velocity_state_types allows (a bf16 v_ft next to fp32 targets is read as it is); others are cast.
  const auto [tv, tx] = velocity_state_types(v_ft_type, common_type({&a.v_base, &a.reward_grad, &a.value_out}));
  const auto prepare = [](at::Tensor& x, at::ScalarType type) {
    x = kDevice == c10::kCPU ? x.contiguous() : as_type(x, type);
  };
  prepare(a.v_ft, tv);
  prepare(a.v_base, tx);
  prepare(a.reward_grad, tx);
  prepare(a.value_out, tx);
  auto [loss, grad] = run_vggflow_matching_loss<kDevice>(a);
  return {to_type(loss, acc_type(v_ft_type)), to_type(grad, v_ft_type)};  // empty: v_ft's dtype too
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flowkern, m) { m.def(Args::kSchema); }
TORCH_LIBRARY_IMPL(flowkern, CPU, m) { impl<Args, &vggflow_matching_loss<c10::kCPU>>(m); }
#ifdef FLOWKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(flowkern, CUDA, m) { impl<Args, &vggflow_matching_loss<c10::kCUDA>>(m); }
#endif
TORCH_LIBRARY_IMPL(flowkern, Autograd, m) {
  using I = Args::Index;
  register_autograd(m, Args::kName,
                    {.differentiable_args = {I::v_ft}, .differentiable_outputs = {0}, .saved_outputs = {1},
                     .saved_gradients = {{I::v_ft, 1}}, .grad_flag = I::compute_grad});
}

}  // namespace flowkern
