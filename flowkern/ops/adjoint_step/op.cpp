// adjoint_step (M23, M25, M31) and its backward: argument checks, CPU/CUDA registration and autograd.
#include "flowkern/op.h"
#include "kernel.h"

namespace flowkern {
namespace {
using Args = args::AdjointStep;
using Backward = args::AdjointStepBackward;

void check_mode(int64_t mode) {
  TORCH_CHECK_VALUE(mode == 0 || mode == 1, "mode must be 0 (ode) or 1 (memoryless), got ", mode);
}

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> adjoint_step(Args& a) {
  check_primary(a.a, "a");
  check_input(a.vjp_u, "vjp_u", a.a, "a");
  check_optional_input(a.vjp_c, "vjp_c", a.a, "a");
  check_mode(a.mode);
  const auto [tv, tx] = velocity_state_types(common_type({&a.vjp_u, a.vjp_c ? &*a.vjp_c : nullptr}), a.a.scalar_type());
  const at::ScalarType acc = acc_type(tx);
  a.h.check(a.a, acc);
  if (a.vjp_c) a.w.check(a.a, acc);
  if (a.mode == 1) a.kappa.check(a.a, acc);
  const at::ScalarType a_type = a.a.scalar_type(), u_type = a.vjp_u.scalar_type();
  a.a = as_type(a.a, tx);
  a.vjp_u = as_type(a.vjp_u, tv);
  a.vjp_c = as_type(a.vjp_c, tv);
  if (!a.vjp_c) a.w = CoefArg{};
  if (a.mode != 1) a.kappa = CoefArg{};
  auto [a_new, cot] = run_adjoint_step<kDevice>(a);
  return {to_type(a_new, acc_type(a_type)), to_type(cot, u_type)};
}

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> adjoint_step_backward(Backward& a) {
  const int64_t batch = a.batch;
  TORCH_CHECK_VALUE(a.grad_a_new || a.grad_cot, "adjoint_step_backward needs grad_a_new or grad_cot");
  check_mode(a.mode);
  TORCH_CHECK_VALUE(!a.grad_a_new || (a.grad_a_new->dim() >= 1 && a.grad_a_new->size(0) == batch),
                    "grad_a_new must have batch ", batch);
  TORCH_CHECK_VALUE(!a.grad_cot || (a.grad_cot->dim() >= 1 && a.grad_cot->size(0) == (a.cfg ? 2 : 1) * batch),
                    "grad_cot must have batch ", (a.cfg ? 2 : 1) * batch);
  TORCH_CHECK_VALUE(a.cfg || !a.need_c, "need_c requires cfg");
  const auto [tv, tx] = adjoint_step_backward_types(a);
  const at::ScalarType acc = acc_type(tx);
  // one sample's rows: the coefficients are checked against B (grad_cot has 2B rows with CFG)
  const at::Tensor like = a.grad_a_new ? *a.grad_a_new : a.grad_cot->narrow(0, 0, batch);
  a.h.check(like, acc);
  if (a.cfg) a.w.check(like, acc);
  if (a.mode == 1) a.kappa.check(like, acc);
  a.grad_a_new = as_type(a.grad_a_new, acc);
  a.grad_cot = as_type(a.grad_cot, tv);
  if (!a.cfg) a.w = CoefArg{};
  if (a.mode != 1) a.kappa = CoefArg{};
  return run_adjoint_step_backward<kDevice>(a);
}

c10::IValue optional(const at::Tensor& x) { return x.defined() ? c10::IValue(x) : c10::IValue(); }

// G = g_a + g_cot[:B] + g_cot[B:]; d a = G | (1 - h kappa) G, d vjp_u = c (1-w) G, d vjp_c = c w G (c = h | 2h).
std::vector<at::Tensor> adjoint_step_autograd_backward(BackwardContext& ctx, const std::vector<at::Tensor>& grads) {
  using I = Args::Index;
  const auto& a = ctx.args;
  const at::Tensor& g_a = grads[0];
  const at::Tensor g_cot = grads[1].defined() && grads[1].sym_numel() != 0 ? grads[1] : at::Tensor();  // cot not returned
  std::vector<at::Tensor> out(a.size());
  if (!g_a.defined() && !g_cot.defined()) return out;
  const bool cfg = ctx.input_type(I::vjp_c) != at::ScalarType::Undefined;
  const int64_t mode = a[I::mode].toInt();
  bool need_a = ctx.needs_grad(I::a);
  const bool need_u = ctx.needs_grad(I::vjp_u), need_c = cfg && ctx.needs_grad(I::vjp_c);
  if (need_a && mode == 0 && !g_cot.defined()) {
    out[I::a] = g_a;  // d a = g_a: no kernel
    need_a = false;
  }
  if (need_a || need_u || need_c) {
    const c10::SymInt batch = g_a.defined() ? g_a.sym_size(0) : g_cot.sym_size(0) / (cfg ? 2 : 1);
    torch::jit::Stack r = call_op("adjoint_step_backward",
                                  {optional(g_a), optional(g_cot), batch, a[I::h], a[I::h_value], a[I::w],
                                   a[I::w_value], a[I::kappa], a[I::kappa_value], a[I::mode], cfg, need_a, need_u,
                                   need_c});
    if (need_a) out[I::a] = r[0].toTensor();
    if (need_u) out[I::vjp_u] = r[1].toTensor();
    if (need_c) out[I::vjp_c] = r[2].toTensor();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flowkern, m) {
  m.def(Args::kSchema);
  m.def(Backward::kSchema);
}
TORCH_LIBRARY_IMPL(flowkern, CPU, m) {
  impl<Args, &adjoint_step<c10::kCPU>>(m);
  impl<Backward, &adjoint_step_backward<c10::kCPU>>(m);
}
#ifdef FLOWKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(flowkern, CUDA, m) {
  impl<Args, &adjoint_step<c10::kCUDA>>(m);
  impl<Backward, &adjoint_step_backward<c10::kCUDA>>(m);
}
#endif
TORCH_LIBRARY_IMPL(flowkern, Autograd, m) {
  using I = Args::Index;
  register_autograd(m, Args::kName,
                    {.differentiable_args = {I::a, I::vjp_u, I::vjp_c}, .differentiable_outputs = {0, 1},
                     .saved_args = {I::h, I::h_value, I::w, I::w_value, I::kappa, I::kappa_value, I::mode},
                     .backward = &adjoint_step_autograd_backward});
  m.impl(Backward::kName, torch::CppFunction::makeFallthrough());
}

}  // namespace flowkern
