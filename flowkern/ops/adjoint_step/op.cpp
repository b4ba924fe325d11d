// adjoint_step (M23, M25, M31) and its backward: schemas, argument checks, CPU/CUDA registration and autograd.
#include <torch/library.h>

#include "flowkern/autograd.h"
#include "flowkern/checks.h"
#include "kernel.h"

namespace flowkern {
namespace {

// Argument positions of adjoint_step used by its backward.
constexpr int64_t kA = 0, kVjpU = 1, kVjpC = 2, kH = 3, kW = 5, kKappa = 7, kMode = 9;

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> adjoint_step(const at::Tensor& a, const at::Tensor& vjp_u,
                                                const std::optional<at::Tensor>& vjp_c,
                                                const std::optional<at::Tensor>& h, double h_value,
                                                const std::optional<at::Tensor>& w, double w_value,
                                                const std::optional<at::Tensor>& kappa, double kappa_value,
                                                int64_t mode, bool return_cot) {
  check_primary(a, "a");
  check_input(vjp_u, "vjp_u", a, "a");
  check_optional_input(vjp_c, "vjp_c", a, "a");
  TORCH_CHECK_VALUE(mode == 0 || mode == 1, "mode must be 0 (ode) or 1 (memoryless), got ", mode);
  const auto [tv, tx] = velocity_state_types(common_type({&vjp_u, vjp_c ? &*vjp_c : nullptr}), a.scalar_type());
  const at::ScalarType acc = acc_type(tx);
  auto [a_new, cot] = run_adjoint_step<kDevice>(
      as_type(a, tx), as_type(vjp_u, tv), as_type(vjp_c, tv), coef_arg("h", h, h_value, a, acc),
      vjp_c ? coef_arg("w", w, w_value, a, acc) : CoefArg{},
      mode == 1 ? coef_arg("kappa", kappa, kappa_value, a, acc) : CoefArg{}, mode, return_cot);
  return {to_type(a_new, acc_type(a.scalar_type())), to_type(cot, vjp_u.scalar_type())};
}

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> adjoint_step_backward(
    const std::optional<at::Tensor>& grad_a_new, const std::optional<at::Tensor>& grad_cot, int64_t batch,
    const std::optional<at::Tensor>& h, double h_value, const std::optional<at::Tensor>& w, double w_value,
    const std::optional<at::Tensor>& kappa, double kappa_value, int64_t mode, bool cfg, bool need_a, bool need_u,
    bool need_c) {
  TORCH_CHECK_VALUE(grad_a_new || grad_cot, "adjoint_step_backward needs grad_a_new or grad_cot");
  TORCH_CHECK_VALUE(mode == 0 || mode == 1, "mode must be 0 (ode) or 1 (memoryless), got ", mode);
  TORCH_CHECK_VALUE(!grad_a_new || (grad_a_new->dim() >= 1 && grad_a_new->size(0) == batch),
                    "grad_a_new must have batch ", batch);
  TORCH_CHECK_VALUE(!grad_cot || (grad_cot->dim() >= 1 && grad_cot->size(0) == (cfg ? 2 : 1) * batch),
                    "grad_cot must have batch ", (cfg ? 2 : 1) * batch);
  TORCH_CHECK_VALUE(cfg || !need_c, "need_c requires cfg");
  std::optional<at::ScalarType> tv0, tx0;
  if (grad_cot) tv0 = grad_cot->scalar_type();
  if (grad_a_new) tx0 = grad_a_new->scalar_type();
  if (!tx0) tx0 = (*tv0 == at::kBFloat16 || *tv0 == at::kHalf) ? at::kFloat : *tv0;
  if (!tv0) tv0 = tx0;
  const auto [tv, tx] = velocity_state_types(*tv0, *tx0);
  const at::ScalarType acc = acc_type(tx);
  // one sample's rows: the coefficients are checked against B (grad_cot has 2B rows with CFG)
  const at::Tensor like = grad_a_new ? *grad_a_new : grad_cot->narrow(0, 0, batch);
  return run_adjoint_step_backward<kDevice>(
      as_type(grad_a_new, acc), as_type(grad_cot, tv), batch, coef_arg("h", h, h_value, like, acc),
      cfg ? coef_arg("w", w, w_value, like, acc) : CoefArg{},
      mode == 1 ? coef_arg("kappa", kappa, kappa_value, like, acc) : CoefArg{}, mode, cfg, need_a, need_u, need_c,
      tv, tx);
}

c10::IValue optional(const at::Tensor& x) { return x.defined() ? c10::IValue(x) : c10::IValue(); }

// G = g_a + g_cot[:B] + g_cot[B:]; d a = G | (1 - h kappa) G, d vjp_u = c (1-w) G, d vjp_c = c w G (c = h | 2h).
std::vector<at::Tensor> adjoint_step_autograd_backward(BackwardContext& ctx, const std::vector<at::Tensor>& grads) {
  const auto& a = ctx.args;
  const at::Tensor& g_a = grads[0];
  const at::Tensor g_cot = grads[1].defined() && grads[1].sym_numel() != 0 ? grads[1] : at::Tensor();  // cot not returned
  std::vector<at::Tensor> out(a.size());
  if (!g_a.defined() && !g_cot.defined()) return out;
  const bool cfg = ctx.was_tensor[kVjpC];
  const int64_t mode = a[kMode].toInt();
  bool need_a = ctx.needs_grad[kA];
  const bool need_u = ctx.needs_grad[kVjpU], need_c = cfg && ctx.needs_grad[kVjpC];
  if (need_a && mode == 0 && !g_cot.defined()) {
    out[kA] = g_a;  // d a = g_a: no kernel
    need_a = false;
  }
  if (need_a || need_u || need_c) {
    const c10::SymInt batch = g_a.defined() ? g_a.sym_size(0) : g_cot.sym_size(0) / (cfg ? 2 : 1);
    torch::jit::Stack r = call_op("adjoint_step_backward",
                                  {optional(g_a), optional(g_cot), batch, a[kH], a[kH + 1], a[kW], a[kW + 1],
                                   a[kKappa], a[kKappa + 1], a[kMode], cfg, need_a, need_u, need_c});
    if (need_a) out[kA] = r[0].toTensor();
    if (need_u) out[kVjpU] = r[1].toTensor();
    if (need_c) out[kVjpC] = r[2].toTensor();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flowkern, m) {
  m.def(
      "adjoint_step(Tensor a, Tensor vjp_u, Tensor? vjp_c, Tensor? h, float h_value, Tensor? w, float w_value, "
      "Tensor? kappa, float kappa_value, int mode, bool return_cot) -> (Tensor a_new, Tensor cot)");
  m.def(
      "adjoint_step_backward(Tensor? grad_a_new, Tensor? grad_cot, int batch, Tensor? h, float h_value, Tensor? w, "
      "float w_value, Tensor? kappa, float kappa_value, int mode, bool cfg, bool need_a, bool need_u, bool need_c) "
      "-> (Tensor d_a, Tensor d_vjp_u, Tensor d_vjp_c)");
}
TORCH_LIBRARY_IMPL(flowkern, CPU, m) {
  m.impl("adjoint_step", &adjoint_step<c10::kCPU>);
  m.impl("adjoint_step_backward", &adjoint_step_backward<c10::kCPU>);
}
#ifdef FLOWKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(flowkern, CUDA, m) {
  m.impl("adjoint_step", &adjoint_step<c10::kCUDA>);
  m.impl("adjoint_step_backward", &adjoint_step_backward<c10::kCUDA>);
}
#endif
TORCH_LIBRARY_IMPL(flowkern, Autograd, m) {
  register_autograd(m, "adjoint_step",
                    {.differentiable_args = {kA, kVjpU, kVjpC}, .differentiable_outputs = {0, 1},
                     .saved_args = {kH, kH + 1, kW, kW + 1, kKappa, kKappa + 1, kMode},
                     .backward = &adjoint_step_autograd_backward});
  m.impl("adjoint_step_backward", torch::CppFunction::makeFallthrough());
}

}  // namespace flowkern
