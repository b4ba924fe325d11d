// cfg_euler (M5, M2, M6, M30) and its backward: schemas, argument checks, CPU/CUDA registration and autograd.
#include <torch/library.h>

#include "flowkern/autograd.h"
#include "flowkern/checks.h"
#include "kernel.h"

namespace flowkern {
namespace {

// Argument positions of cfg_euler used by its backward.
constexpr int64_t kUncond = 0, kCond = 1, kX = 2, kW = 3, kH = 5, kT = 7, kKappa = 9, kMode = 14, kStopgradXhat = 15;

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cfg_euler(
    const std::optional<at::Tensor>& v_uncond, const at::Tensor& v_cond, const at::Tensor& x,
    const std::optional<at::Tensor>& w, double w_value, const std::optional<at::Tensor>& h, double h_value,
    const std::optional<at::Tensor>& t, double t_value, const std::optional<at::Tensor>& kappa, double kappa_value,
    const std::optional<at::Tensor>& sigma, double sigma_value, const std::optional<at::Tensor>& noise, int64_t mode,
    bool stopgrad_xhat) {
  check_primary(v_cond, "v_cond");
  check_input(x, "x", v_cond, "v_cond");
  check_optional_input(v_uncond, "v_uncond", v_cond, "v_cond");
  check_optional_input(noise, "noise", x, "x");
  TORCH_CHECK_VALUE(mode == 0 || mode == 1, "mode must be 0 (ode) or 1 (memoryless), got ", mode);
  TORCH_CHECK_VALUE(mode == 0 || noise.has_value(), "noise is required with mode='memoryless' (M30)");
  const auto [tv, tx] = velocity_state_types(common_type({&v_cond, v_uncond ? &*v_uncond : nullptr}),
                                             common_type({&x, noise ? &*noise : nullptr}));
  const at::ScalarType acc = acc_type(tx);
  CoefArg coef_kappa, coef_sigma;
  if (mode == 1) {
    coef_kappa = coef_arg("kappa", kappa, kappa_value, x, acc);
    coef_sigma = coef_arg("sigma", sigma, sigma_value, x, acc);
  }
  auto [v, x_next, x_hat1] = run_cfg_euler<kDevice>(
      as_type(v_uncond, tv), as_type(v_cond, tv), as_type(x, tx), coef_arg("w", w, w_value, x, acc),
      coef_arg("h", h, h_value, x, acc), coef_arg("t", t, t_value, x, acc), coef_kappa, coef_sigma,
      mode == 1 ? as_type(noise, tx) : std::nullopt, mode);
  return {to_type(v, v_cond.scalar_type()), to_type(x_next, x.scalar_type()), to_type(x_hat1, x.scalar_type())};
}

// The kernels' (velocity, state) types for the given cotangents; the engine casts the gradients to the inputs' types.
std::pair<at::ScalarType, at::ScalarType> backward_types(const std::optional<at::Tensor>& grad_v,
                                                         const std::optional<at::Tensor>& grad_next,
                                                         const std::optional<at::Tensor>& grad_hat) {
  const at::Tensor* state = grad_next ? &*grad_next : (grad_hat ? &*grad_hat : nullptr);
  std::optional<at::ScalarType> tv, tx;
  if (grad_v) tv = grad_v->scalar_type();
  if (state) tx = common_type({state, grad_hat ? &*grad_hat : nullptr});
  if (!tv) tv = tx;
  if (!tx) tx = (*tv == at::kBFloat16 || *tv == at::kHalf) ? at::kFloat : *tv;
  return velocity_state_types(*tv, *tx);
}

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cfg_euler_backward(
    const std::optional<at::Tensor>& grad_v, const std::optional<at::Tensor>& grad_next,
    const std::optional<at::Tensor>& grad_hat, const std::optional<at::Tensor>& w, double w_value,
    const std::optional<at::Tensor>& h, double h_value, const std::optional<at::Tensor>& t, double t_value,
    const std::optional<at::Tensor>& kappa, double kappa_value, int64_t mode, bool stopgrad_xhat, bool need_uncond,
    bool need_cond, bool need_x) {
  TORCH_CHECK_VALUE(grad_v || grad_next || grad_hat, "cfg_euler_backward needs one of grad_v, grad_next, grad_hat");
  const at::Tensor& like = grad_v ? *grad_v : (grad_next ? *grad_next : *grad_hat);
  check_primary(like, "the cotangent");
  check_optional_input(grad_next, "grad_next", like, "grad_v");
  check_optional_input(grad_hat, "grad_hat", like, "grad_v");
  TORCH_CHECK_VALUE(mode == 0 || mode == 1, "mode must be 0 (ode) or 1 (memoryless), got ", mode);
  const auto [tv, tx] = backward_types(grad_v, grad_next, grad_hat);
  const at::ScalarType acc = acc_type(tx);
  return run_cfg_euler_backward<kDevice>(
      as_type(grad_v, tv), as_type(grad_next, tx), as_type(grad_hat, tx), coef_arg("w", w, w_value, like, acc),
      coef_arg("h", h, h_value, like, acc), coef_arg("t", t, t_value, like, acc),
      mode == 1 ? coef_arg("kappa", kappa, kappa_value, like, acc) : CoefArg{}, mode, stopgrad_xhat, need_uncond,
      need_cond, need_x, tv, tx);
}

c10::IValue optional(const at::Tensor& x) { return x.defined() ? c10::IValue(x) : c10::IValue(); }

// gbar = g_v + c_n g_n + (1-t) g_h [not stopgrad_xhat]; d v_c = w gbar, d v_u = (1-w) gbar, d x = a_n g_n + g_h.
// Absent cotangents are never materialised; the identities need no kernel.
std::vector<at::Tensor> cfg_euler_autograd_backward(BackwardContext& ctx, const std::vector<at::Tensor>& grads) {
  const auto& a = ctx.args;
  const at::Tensor &gv = grads[0], &gn = grads[1], &gh = grads[2];
  const int64_t mode = a[kMode].toInt();
  const bool stopgrad_xhat = a[kStopgradXhat].toBool();
  const bool v_terms = gv.defined() || gn.defined() || (gh.defined() && !stopgrad_xhat);
  bool need_uncond = ctx.needs_grad[kUncond] && v_terms, need_cond = ctx.needs_grad[kCond] && v_terms;
  bool need_x = ctx.needs_grad[kX] && (gn.defined() || gh.defined());
  std::vector<at::Tensor> out(a.size());
  if (need_cond && gv.defined() && !gn.defined() && !(gh.defined() && !stopgrad_xhat) && !a[kW].isTensor() &&
      a[kW + 1].toDouble() == 1.0) {
    out[kCond] = gv;  // d v_cond = 1 * g_v (no CFG)
    need_cond = false;
  }
  if (need_x && mode == 0 && gn.defined() != gh.defined()) {
    out[kX] = gn.defined() ? gn : gh;  // d x = the one x cotangent ('ode')
    need_x = false;
  }
  if (need_uncond || need_cond || need_x) {
    torch::jit::Stack r = call_op("cfg_euler_backward", {optional(gv), optional(gn), optional(gh), a[kW], a[kW + 1],
                                                          a[kH], a[kH + 1], a[kT], a[kT + 1], a[kKappa],
                                                          a[kKappa + 1], a[kMode], a[kStopgradXhat], need_uncond,
                                                          need_cond, need_x});
    if (need_uncond) out[kUncond] = r[0].toTensor();
    if (need_cond) out[kCond] = r[1].toTensor();
    if (need_x) out[kX] = r[2].toTensor();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flowkern, m) {
  m.def(
      "cfg_euler(Tensor? v_uncond, Tensor v_cond, Tensor x, Tensor? w, float w_value, Tensor? h, float h_value, "
      "Tensor? t, float t_value, Tensor? kappa, float kappa_value, Tensor? sigma, float sigma_value, Tensor? noise, "
      "int mode, bool stopgrad_xhat) -> (Tensor v, Tensor x_next, Tensor x_hat1)");
  m.def(
      "cfg_euler_backward(Tensor? grad_v, Tensor? grad_next, Tensor? grad_hat, Tensor? w, float w_value, Tensor? h, "
      "float h_value, Tensor? t, float t_value, Tensor? kappa, float kappa_value, int mode, bool stopgrad_xhat, "
      "bool need_uncond, bool need_cond, bool need_x) -> (Tensor d_uncond, Tensor d_cond, Tensor d_x)");
}
TORCH_LIBRARY_IMPL(flowkern, CPU, m) {
  m.impl("cfg_euler", &cfg_euler<c10::kCPU>);
  m.impl("cfg_euler_backward", &cfg_euler_backward<c10::kCPU>);
}
#ifdef FLOWKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(flowkern, CUDA, m) {
  m.impl("cfg_euler", &cfg_euler<c10::kCUDA>);
  m.impl("cfg_euler_backward", &cfg_euler_backward<c10::kCUDA>);
}
#endif
TORCH_LIBRARY_IMPL(flowkern, Autograd, m) {
  register_autograd(m, "cfg_euler",
                    {.differentiable_args = {kUncond, kCond, kX}, .differentiable_outputs = {0, 1, 2},
                     .saved_args = {kW, kW + 1, kH, kH + 1, kT, kT + 1, kKappa, kKappa + 1, kMode, kStopgradXhat},
                     .backward = &cfg_euler_autograd_backward});
  m.impl("cfg_euler_backward", torch::CppFunction::makeFallthrough());
}

}  // namespace flowkern
