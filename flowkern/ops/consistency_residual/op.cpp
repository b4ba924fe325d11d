// consistency_residual (M17, M18, M20), its backward, and consistency_residual_exact (M21): argument checks, CPU/CUDA
// registration and autograd.
#include <ATen/ops/div.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>

#include "flowkern/op.h"
#include "../cfg_euler/kernel.h"  // velocity_state_types
#include "kernel.h"

namespace flowkern {
namespace {
using Residual = args::ConsistencyResidual;
using Backward = args::ConsistencyResidualBackward;
using Exact = args::ConsistencyResidualExact;

void check_eps(double eps_t, double eps_x) {
  check_float("eps_t", eps_t, /*positive=*/true);
  check_float("eps_x", eps_x, /*positive=*/true);
}

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_residual(Residual& a) {
  check_primary(a.c, "c");
  const std::pair<at::Tensor*, const char*> others[] = {{&a.c_t, "c_t"},       {&a.c_x, "c_x"},   {&a.ghat, "ghat"},
                                                        {&a.ghat_t, "ghat_t"}, {&a.ghat_x, "ghat_x"},
                                                        {&a.vb, "vb"},         {&a.vb_G, "vb_G"}};
  for (const auto& [x, name] : others) check_input(*x, name, a.c, "c");
  check_float("beta", a.beta, /*positive=*/true);
  eta_code(a.eta_mode);
  check_eps(a.eps_t, a.eps_x);
  const at::ScalarType c_type = a.c.scalar_type();
  const at::ScalarType type = common_type({&a.c, &a.c_t, &a.c_x, &a.ghat, &a.ghat_t, &a.ghat_x, &a.vb, &a.vb_G});
  for (CoefArg* coef : {&a.t, &a.rho_w, &a.rho_G, &a.mask}) coef->check(a.c, acc_type(type));
  if constexpr (kDevice == c10::kCPU) {  // the CPU kernel reads one element type
    a.c = as_type(a.c, type);
    for (const auto& [x, name] : others) *x = as_type(*x, type);
  } else {  // the value outputs c, c_t, c_x in TV, the targets in TX: bf16 values next to fp32 targets are read as is
    const auto [tv, tx] = velocity_state_types(common_type({&a.c, &a.c_t, &a.c_x}),
                                               common_type({&a.ghat, &a.ghat_t, &a.ghat_x, &a.vb, &a.vb_G}));
    for (at::Tensor* x : {&a.c, &a.c_t, &a.c_x}) *x = as_type(*x, tv);
    for (at::Tensor* x : {&a.ghat, &a.ghat_t, &a.ghat_x, &a.vb, &a.vb_G}) *x = as_type(*x, tx);
  }
  auto [l_cons, l_bnd, q] = run_consistency_residual<kDevice>(a);
  const at::ScalarType out = acc_type(c_type);  // q and the losses follow c even when another input is fp64
  return {to_type(l_cons, out), to_type(l_bnd, out), to_type(q, out)};
}

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_residual_backward(Backward& a) {
  check_primary(a.c, "c");
  const at::ScalarType acc = acc_type(a.out_type);
  TORCH_CHECK_VALUE(a.q.sizes() == a.c.sizes() && a.q.device() == a.c.device(), "q must have c's shape and device");
  TORCH_CHECK_VALUE(a.grad_cons.dim() == 0 && a.grad_bnd.dim() == 0, "grad_cons and grad_bnd must be 0-dim");
  check_eps(a.eps_t, a.eps_x);
  a.grad_cons = to_type(a.grad_cons, acc);
  a.grad_bnd = to_type(a.grad_bnd, acc);
  a.q = as_type(a.q, acc);
  a.c = as_type(a.c, a.out_type);
  for (CoefArg* coef : {&a.t, &a.rho_w, &a.mask}) coef->check(a.c, acc);
  return run_consistency_residual_backward<kDevice>(a);
}

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_residual_exact(Exact& a) {
  check_primary(a.dG, "dG");
  check_input(a.t3, "t3", a.dG, "dG");
  check_input(a.c, "c", a.dG, "dG");
  const at::ScalarType dG_type = a.dG.scalar_type();
  const at::ScalarType type = common_type({&a.dG, &a.t3, &a.c});
  a.mask.check(a.dG, acc_type(type));
  for (at::Tensor* x : {&a.dG, &a.t3, &a.c}) *x = as_type(*x, type);
  auto [l_cons, l_bnd, grad] = run_consistency_residual_exact<kDevice>(a);
  const at::ScalarType out = acc_type(dG_type);
  return {to_type(l_cons, out), to_type(l_bnd, out), to_type(grad, dG_type)};  // empty: dG's dtype too
}

at::ScalarType common_type_of(std::initializer_list<at::ScalarType> types) {
  const at::ScalarType first = *types.begin();
  bool same = true, any_double = false;
  for (at::ScalarType t : types) {
    same &= t == first;
    any_double |= t == at::kDouble;
  }
  return same ? first : (any_double ? at::kDouble : at::kFloat);
}

at::Tensor zero_if_undefined(const at::Tensor& g, const at::Tensor& like) {
  return g.defined() ? g : at::zeros({}, like.options());
}

// L_cons alone reaches c_t, c_x; without its cotangent they get nothing (None) instead of written zeros.
std::vector<at::Tensor> residual_backward(BackwardContext& ctx, const std::vector<at::Tensor>& grads) {
  using I = Residual::Index;
  std::vector<at::Tensor> out(ctx.args.size());
  const at::Tensor& q = ctx.outputs[2];
  const bool has_cons = grads[0].defined();
  const bool need_c = ctx.needs_grad(I::c), need_c_t = ctx.needs_grad(I::c_t) && has_cons,
             need_c_x = ctx.needs_grad(I::c_x) && has_cons;
  if (q.sym_numel() == 0 || !(need_c || need_c_t || need_c_x) || !(has_cons || grads[1].defined())) return out;
  const auto& a = ctx.args;
  torch::jit::Stack grads_out = call_op(
      "consistency_residual_backward",
      {zero_if_undefined(grads[0], q), zero_if_undefined(grads[1], q), q, a[I::c], a[I::t], a[I::t_value],
       a[I::rho_w], a[I::rho_w_value], a[I::mask], a[I::mask_value], a[I::eps_t], a[I::eps_x], need_c, need_c_t,
       need_c_x,
       // the gradients' dtype: the value outputs' common one (the engine casts each to its input's dtype)
       common_type_of({ctx.input_type(I::c), ctx.input_type(I::c_t), ctx.input_type(I::c_x)})});
  if (need_c) out[I::c] = grads_out[0].toTensor();
  if (need_c_t) out[I::c_t] = grads_out[1].toTensor();
  if (need_c_x) out[I::c_x] = grads_out[2].toTensor();
  return out;
}

// exact (M21): d dG = g_cons * (saved 2R/D); d c = g_bnd * 2 m_b c / D (M17), in c's dtype.
std::vector<at::Tensor> exact_backward(BackwardContext& ctx, const std::vector<at::Tensor>& grads) {
  using I = Exact::Index;
  std::vector<at::Tensor> out(ctx.args.size());
  at::Tensor& saved = ctx.outputs[2];
  if (ctx.needs_grad(I::dG) && grads[0].defined() && saved.sym_numel() != 0) {
    out[I::dG] = scale_saved_gradient(ctx.releasing ? std::move(saved) : saved, grads[0], ctx.releasing);
  }
  if (ctx.needs_grad(I::c) && grads[1].defined()) {
    const at::Tensor c = ctx.args[I::c].toTensor();
    const at::ScalarType acc = acc_type(c.scalar_type());
    std::vector<int64_t> view(c.dim(), 1);
    view[0] = -1;
    at::Tensor coef = at::div(at::mul(grads[1].to(acc), 2.0), c10::Scalar(c.sym_numel()));
    coef = ctx.args[I::mask].isTensor() ? at::mul(coef, ctx.args[I::mask].toTensor().to(acc).reshape(view))
                                        : at::mul(coef, ctx.args[I::mask_value].toDouble());
    out[I::c] = at::mul(c.to(acc), coef).to(c.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flowkern, m) {
  m.def(Residual::kSchema);
  m.def(Backward::kSchema);
  m.def(Exact::kSchema);
}
TORCH_LIBRARY_IMPL(flowkern, CPU, m) {
  impl<Residual, &consistency_residual<c10::kCPU>>(m);
  impl<Backward, &consistency_residual_backward<c10::kCPU>>(m);
  impl<Exact, &consistency_residual_exact<c10::kCPU>>(m);
}
#ifdef FLOWKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(flowkern, CUDA, m) {
  impl<Residual, &consistency_residual<c10::kCUDA>>(m);
  impl<Backward, &consistency_residual_backward<c10::kCUDA>>(m);
  impl<Exact, &consistency_residual_exact<c10::kCUDA>>(m);
}
#endif
TORCH_LIBRARY_IMPL(flowkern, Autograd, m) {
  using R = Residual::Index;
  using E = Exact::Index;
  register_autograd(m, Residual::kName,
                    {.differentiable_args = {R::c, R::c_t, R::c_x}, .differentiable_outputs = {0, 1},
                     .saved_args = {R::c, R::t, R::t_value, R::eps_t, R::eps_x, R::rho_w, R::rho_w_value, R::mask,
                                    R::mask_value},
                     .saved_outputs = {2}, .backward = &residual_backward, .grad_flag = R::compute_grad});
  register_autograd(m, Exact::kName,
                    {.differentiable_args = {E::dG, E::c}, .differentiable_outputs = {0, 1},
                     .saved_args = {E::c, E::mask, E::mask_value}, .saved_outputs = {2}, .backward = &exact_backward,
                     .grad_flag = E::compute_grad, .grad_flag_args = {E::dG}});
  m.impl(Backward::kName, torch::CppFunction::makeFallthrough());  // never differentiated twice
}

}  // namespace flowkern
