// consistency_residual (M17, M18, M20), its backward, and consistency_residual_exact (M21): schemas, argument checks,
// CPU/CUDA registration and autograd. Argument positions used by the backward functions are named below.
#include <ATen/ops/div.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>

#include "flowkern/autograd.h"
#include "flowkern/checks.h"
#include "kernel.h"

namespace flowkern {
namespace {

void check_eps(double eps_t, double eps_x) {
  TORCH_CHECK_VALUE(std::isfinite(eps_t) && eps_t > 0, "eps_t must be a positive finite float, got ", eps_t);
  TORCH_CHECK_VALUE(std::isfinite(eps_x) && eps_x > 0, "eps_x must be a positive finite float, got ", eps_x);
}

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_residual(
    const at::Tensor& c, const at::Tensor& c_t, const at::Tensor& c_x, const at::Tensor& ghat, const at::Tensor& ghat_t,
    const at::Tensor& ghat_x, const at::Tensor& vb, const at::Tensor& vb_G, const std::optional<at::Tensor>& t,
    double t_value, double beta, int64_t eta_mode, double eps_t, double eps_x, const std::optional<at::Tensor>& rho_w,
    double rho_w_value, const std::optional<at::Tensor>& rho_G, double rho_G_value,
    const std::optional<at::Tensor>& mask, double mask_value, bool compute_grad) {
  check_primary(c, "c");
  const std::pair<const at::Tensor*, const char*> others[] = {{&c_t, "c_t"},       {&c_x, "c_x"},
                                                              {&ghat, "ghat"},     {&ghat_t, "ghat_t"},
                                                              {&ghat_x, "ghat_x"}, {&vb, "vb"},
                                                              {&vb_G, "vb_G"}};
  for (const auto& [x, name] : others) check_input(*x, name, c, "c");
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta > 0, "beta must be > 0, got ", beta);
  TORCH_CHECK_VALUE(eta_mode >= 0 && eta_mode <= 2, "eta_mode must be 0 (quad), 1 (linear) or 2 (constant)");
  check_eps(eps_t, eps_x);
  const at::ScalarType type = common_type({&c, &c_t, &c_x, &ghat, &ghat_t, &ghat_x, &vb, &vb_G});
  const at::ScalarType acc = acc_type(type);
  auto [l_cons, l_bnd, q] = run_consistency_residual<kDevice>(
      as_type(c, type), as_type(c_t, type), as_type(c_x, type), as_type(ghat, type), as_type(ghat_t, type),
      as_type(ghat_x, type), as_type(vb, type), as_type(vb_G, type), coef_arg("t", t, t_value, c, acc), beta,
      eta_mode, eps_t, eps_x, coef_arg("rho_w", rho_w, rho_w_value, c, acc),
      coef_arg("rho_G", rho_G, rho_G_value, c, acc), coef_arg("mask", mask, mask_value, c, acc), compute_grad);
  const at::ScalarType out = acc_type(c.scalar_type());  // q and the losses follow c even when another input is fp64
  return {to_type(l_cons, out), to_type(l_bnd, out), to_type(q, out)};
}

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_residual_backward(
    const at::Tensor& grad_cons, const at::Tensor& grad_bnd, const at::Tensor& q, const at::Tensor& c,
    const std::optional<at::Tensor>& t, double t_value, const std::optional<at::Tensor>& rho_w, double rho_w_value,
    const std::optional<at::Tensor>& mask, double mask_value, double eps_t, double eps_x, bool need_c, bool need_c_t,
    bool need_c_x, at::ScalarType out_type) {
  check_primary(c, "c");
  const at::ScalarType acc = acc_type(out_type);
  TORCH_CHECK_VALUE(q.sizes() == c.sizes() && q.device() == c.device(), "q must have c's shape and device");
  TORCH_CHECK_VALUE(grad_cons.dim() == 0 && grad_bnd.dim() == 0, "grad_cons and grad_bnd must be 0-dim");
  check_eps(eps_t, eps_x);
  return run_consistency_residual_backward<kDevice>(
      to_type(grad_cons, acc), to_type(grad_bnd, acc), as_type(q, acc), as_type(c, out_type),
      coef_arg("t", t, t_value, c, acc),
      coef_arg("rho_w", rho_w, rho_w_value, c, acc), coef_arg("mask", mask, mask_value, c, acc), eps_t, eps_x, need_c,
      need_c_t, need_c_x);
}

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_residual_exact(const at::Tensor& dG, const at::Tensor& t3,
                                                                          const at::Tensor& c,
                                                                          const std::optional<at::Tensor>& mask,
                                                                          double mask_value, bool compute_grad) {
  check_primary(dG, "dG");
  check_input(t3, "t3", dG, "dG");
  check_input(c, "c", dG, "dG");
  const at::ScalarType type = common_type({&dG, &t3, &c});
  auto [l_cons, l_bnd, grad] = run_consistency_residual_exact<kDevice>(
      as_type(dG, type), as_type(t3, type), as_type(c, type),
      coef_arg("mask", mask, mask_value, dG, acc_type(type)), compute_grad);
  const at::ScalarType out = acc_type(dG.scalar_type());
  return {to_type(l_cons, out), to_type(l_bnd, out), to_type(grad, dG.scalar_type())};  // empty: dG's dtype too
}

// Argument positions of consistency_residual used by its backward.
constexpr int64_t kC = 0, kCT = 1, kCX = 2, kT = 8, kEpsT = 12, kEpsX = 13, kRhoW = 14, kMask = 18;

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
  std::vector<at::Tensor> out(ctx.args.size());
  const at::Tensor& q = ctx.outputs[2];
  const bool has_cons = grads[0].defined();
  const bool need_c = ctx.needs_grad[kC], need_c_t = ctx.needs_grad[kCT] && has_cons,
             need_c_x = ctx.needs_grad[kCX] && has_cons;
  if (q.sym_numel() == 0 || !(need_c || need_c_t || need_c_x) || !(has_cons || grads[1].defined())) return out;
  const auto& a = ctx.args;
  torch::jit::Stack grads_out = call_op(
      "consistency_residual_backward",
      {zero_if_undefined(grads[0], q), zero_if_undefined(grads[1], q), q, a[kC], a[kT], a[kT + 1], a[kRhoW],
       a[kRhoW + 1], a[kMask], a[kMask + 1], a[kEpsT], a[kEpsX], need_c, need_c_t, need_c_x,
       // the gradients' dtype: the value outputs' common one (the engine casts each to its input's dtype)
       common_type_of({ctx.types[kC], ctx.types[kCT], ctx.types[kCX]})});
  if (need_c) out[kC] = grads_out[0].toTensor();
  if (need_c_t) out[kCT] = grads_out[1].toTensor();
  if (need_c_x) out[kCX] = grads_out[2].toTensor();
  return out;
}

// exact (M21): d dG = g_cons * (saved 2R/D); d c = g_bnd * 2 m_b c / D (M17), in c's dtype.
std::vector<at::Tensor> exact_backward(BackwardContext& ctx, const std::vector<at::Tensor>& grads) {
  std::vector<at::Tensor> out(ctx.args.size());
  at::Tensor& saved = ctx.outputs[2];
  if (ctx.needs_grad[0] && grads[0].defined() && saved.sym_numel() != 0) {
    out[0] = scale_saved_gradient(std::move(saved), grads[0], ctx.releasing);
  }
  if (ctx.needs_grad[2] && grads[1].defined()) {
    const at::Tensor c = ctx.args[2].toTensor();
    const at::ScalarType acc = acc_type(c.scalar_type());
    std::vector<int64_t> view(c.dim(), 1);
    view[0] = -1;
    at::Tensor coef = at::div(at::mul(grads[1].to(acc), 2.0), c10::Scalar(c.sym_numel()));
    coef = ctx.args[3].isTensor() ? at::mul(coef, ctx.args[3].toTensor().to(acc).reshape(view))
                                  : at::mul(coef, ctx.args[4].toDouble());
    out[2] = at::mul(c.to(acc), coef).to(c.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flowkern, m) {
  m.def(
      "consistency_residual(Tensor c, Tensor c_t, Tensor c_x, Tensor ghat, Tensor ghat_t, Tensor ghat_x, Tensor vb, "
      "Tensor vb_G, Tensor? t, float t_value, float beta, int eta_mode, float eps_t, float eps_x, Tensor? rho_w, "
      "float rho_w_value, Tensor? rho_G, float rho_G_value, Tensor? mask, float mask_value, bool compute_grad) "
      "-> (Tensor l_cons, Tensor l_bnd, Tensor q)");
  m.def(
      "consistency_residual_backward(Tensor grad_cons, Tensor grad_bnd, Tensor q, Tensor c, Tensor? t, "
      "float t_value, Tensor? rho_w, float rho_w_value, Tensor? mask, float mask_value, float eps_t, float eps_x, "
      "bool need_c, bool need_c_t, bool need_c_x, ScalarType out_type) -> (Tensor grad_c, Tensor grad_c_t, "
      "Tensor grad_c_x)");
  m.def(
      "consistency_residual_exact(Tensor dG, Tensor t3, Tensor c, Tensor? mask, float mask_value, bool compute_grad) "
      "-> (Tensor l_cons, Tensor l_bnd, Tensor grad)");
}
TORCH_LIBRARY_IMPL(flowkern, CPU, m) {
  m.impl("consistency_residual", &consistency_residual<c10::kCPU>);
  m.impl("consistency_residual_backward", &consistency_residual_backward<c10::kCPU>);
  m.impl("consistency_residual_exact", &consistency_residual_exact<c10::kCPU>);
}
#ifdef FLOWKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(flowkern, CUDA, m) {
  m.impl("consistency_residual", &consistency_residual<c10::kCUDA>);
  m.impl("consistency_residual_backward", &consistency_residual_backward<c10::kCUDA>);
  m.impl("consistency_residual_exact", &consistency_residual_exact<c10::kCUDA>);
}
#endif
TORCH_LIBRARY_IMPL(flowkern, Autograd, m) {
  register_autograd(m, "consistency_residual",
                    {.differentiable_args = {kC, kCT, kCX}, .differentiable_outputs = {0, 1},
                     .saved_args = {kC, kT, kT + 1, kEpsT, kEpsX, kRhoW, kRhoW + 1, kMask, kMask + 1},
                     .saved_outputs = {2}, .backward = &residual_backward});
  register_autograd(m, "consistency_residual_exact",
                    {.differentiable_args = {0, 2}, .differentiable_outputs = {0, 1}, .saved_args = {2, 3, 4},
                     .saved_outputs = {2}, .backward = &exact_backward});
  m.impl("consistency_residual_backward", torch::CppFunction::makeFallthrough());  // never differentiated twice
}

}  // namespace flowkern
