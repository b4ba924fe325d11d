// cfg_euler (M5, M2, M6, M30) and its backward: argument checks, CPU/CUDA registration and autograd.
#include "flowkern/op.h"
#include "kernel.h"

namespace flowkern {
namespace {
using Args = args::CfgEuler;
using Backward = args::CfgEulerBackward;

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cfg_euler(Args& a) {
  check_primary(a.v_cond, "v_cond");
  check_input(a.x, "x", a.v_cond, "v_cond");
  check_optional_input(a.v_uncond, "v_uncond", a.v_cond, "v_cond");
  check_optional_input(a.noise, "noise", a.x, "x");
  const bool memoryless = cfg_euler_mode(a) == 1;
  TORCH_CHECK_VALUE(!memoryless || a.noise.has_value(), "noise is required with mode='memoryless' (M30)");
  const at::ScalarType v_type = a.v_cond.scalar_type(), x_type = a.x.scalar_type();
  const auto [tv, tx] = velocity_state_types(common_type({&a.v_cond, a.v_uncond ? &*a.v_uncond : nullptr}),
                                             common_type({&a.x, a.noise ? &*a.noise : nullptr}));
  const at::ScalarType acc = acc_type(tx);
  for (CoefArg* coef : {&a.w, &a.h, &a.t}) coef->check(a.x, acc);
  if (memoryless) {
    a.kappa.check(a.x, acc);
    a.sigma.check(a.x, acc);
  } else {
    a.noise.reset();
  }
  a.v_uncond = as_type(a.v_uncond, tv);
  a.v_cond = as_type(a.v_cond, tv);
  a.x = as_type(a.x, tx);
  a.noise = as_type(a.noise, tx);
  auto [v, x_next, x_hat1] = run_cfg_euler<kDevice>(a);
  return {to_type(v, v_type), to_type(x_next, x_type), to_type(x_hat1, x_type)};
}

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cfg_euler_backward(Backward& a) {
  TORCH_CHECK_VALUE(a.grad_v || a.grad_next || a.grad_hat,
                    "cfg_euler_backward needs one of grad_v, grad_next, grad_hat");
  const at::Tensor like = a.grad_v ? *a.grad_v : (a.grad_next ? *a.grad_next : *a.grad_hat);
  check_primary(like, "the cotangent");
  check_optional_input(a.grad_next, "grad_next", like, "grad_v");
  check_optional_input(a.grad_hat, "grad_hat", like, "grad_v");
  const bool memoryless = cfg_euler_mode(a) == 1;
  const auto [tv, tx] = cfg_euler_backward_types(a);
  const at::ScalarType acc = acc_type(tx);
  for (CoefArg* coef : {&a.w, &a.h, &a.t}) coef->check(like, acc);
  if (memoryless) a.kappa.check(like, acc);
  a.grad_v = as_type(a.grad_v, tv);
  a.grad_next = as_type(a.grad_next, tx);
  a.grad_hat = as_type(a.grad_hat, tx);
  return run_cfg_euler_backward<kDevice>(a);
}

c10::IValue optional(const at::Tensor& x) { return x.defined() ? c10::IValue(x) : c10::IValue(); }

// gbar = g_v + c_n g_n + (1-t) g_h [not stopgrad_xhat]; d v_c = w gbar, d v_u = (1-w) gbar, d x = a_n g_n + g_h.
// Absent cotangents are never materialised; the identities need no kernel.
std::vector<at::Tensor> cfg_euler_autograd_backward(BackwardContext& ctx, const std::vector<at::Tensor>& grads) {
  using I = Args::Index;
  const auto& a = ctx.args;
  const at::Tensor &gv = grads[0], &gn = grads[1], &gh = grads[2];
  const bool ode = a[I::mode].toStringRef() == "ode";
  const bool stopgrad_xhat = a[I::stopgrad_xhat].toBool();
  const bool v_terms = gv.defined() || gn.defined() || (gh.defined() && !stopgrad_xhat);
  bool need_uncond = ctx.needs_grad(I::v_uncond) && v_terms, need_cond = ctx.needs_grad(I::v_cond) && v_terms;
  bool need_x = ctx.needs_grad(I::x) && (gn.defined() || gh.defined());
  std::vector<at::Tensor> out(a.size());
  if (need_cond && gv.defined() && !gn.defined() && !(gh.defined() && !stopgrad_xhat) && !a[I::w].isTensor() &&
      a[I::w_value].toDouble() == 1.0) {
    out[I::v_cond] = gv;  // d v_cond = 1 * g_v (no CFG)
    need_cond = false;
  }
  if (need_x && ode && gn.defined() != gh.defined()) {
    out[I::x] = gn.defined() ? gn : gh;  // d x = the one x cotangent ('ode')
    need_x = false;
  }
  if (need_uncond || need_cond || need_x) {
    torch::jit::Stack r =
        call_op("cfg_euler_backward", {optional(gv), optional(gn), optional(gh), a[I::w], a[I::w_value], a[I::h],
                                       a[I::h_value], a[I::t], a[I::t_value], a[I::kappa], a[I::kappa_value],
                                       a[I::mode], a[I::stopgrad_xhat], need_uncond, need_cond, need_x});
    if (need_uncond) out[I::v_uncond] = r[0].toTensor();
    if (need_cond) out[I::v_cond] = r[1].toTensor();
    if (need_x) out[I::x] = r[2].toTensor();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flowkern, m) {
  m.def(Args::kSchema);
  m.def(Backward::kSchema);
}
TORCH_LIBRARY_IMPL(flowkern, CPU, m) {
  impl<Args, &cfg_euler<c10::kCPU>>(m);
  impl<Backward, &cfg_euler_backward<c10::kCPU>>(m);
}
#ifdef FLOWKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(flowkern, CUDA, m) {
  impl<Args, &cfg_euler<c10::kCUDA>>(m);
  impl<Backward, &cfg_euler_backward<c10::kCUDA>>(m);
}
#endif
TORCH_LIBRARY_IMPL(flowkern, Autograd, m) {
  using I = Args::Index;
  register_autograd(m, Args::kName,
                    {.differentiable_args = {I::v_uncond, I::v_cond, I::x}, .differentiable_outputs = {0, 1, 2},
                     .saved_args = {I::w, I::w_value, I::h, I::h_value, I::t, I::t_value, I::kappa, I::kappa_value,
                                    I::mode, I::stopgrad_xhat},
                     .backward = &cfg_euler_autograd_backward});
  m.impl(Backward::kName, torch::CppFunction::makeFallthrough());
}

}  // namespace flowkern
