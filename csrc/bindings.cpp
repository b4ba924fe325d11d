// flowkern._C: the only translation unit that includes torch/extension.h (slow to compile).
// Each op has one block: validate (device, dtype, shape, contiguity), dispatch CPU/CUDA, release the GIL.
// Python (flowkern/ops/<op>.py) normalises coefficients and unifies dtypes before calling in.
#include <torch/extension.h>

#include "flowkern/checks.h"
#include "flowkern/ops/adjoint_matching_loss.h"
#include "flowkern/ops/adjoint_step.h"
#include "flowkern/ops/cfg_euler.h"
#include "flowkern/ops/consistency_probes.h"
#include "flowkern/ops/consistency_residual.h"
#include "flowkern/ops/reward_grad_clip.h"
#include "flowkern/ops/vggflow_matching_loss.h"
// @@includes (one line per op, keep sorted)

namespace py = pybind11;

#ifdef FLOWKERN_WITH_CUDA
#define FK_DISPATCH(primary, fn, ...) \
  ((primary).is_cuda() ? flowkern::cuda::fn(__VA_ARGS__) : flowkern::cpu::fn(__VA_ARGS__))
#else
#define FK_DISPATCH(primary, fn, ...)                                                                      \
  ([&] {                                                                                                  \
    TORCH_CHECK(!(primary).is_cuda(), "flowkern._C was built without CUDA; rebuild with nvcc available"); \
    return flowkern::cpu::fn(__VA_ARGS__);                                                                \
  }())
#endif

// ---- vggflow_matching_loss (M16) ----
static std::tuple<at::Tensor, at::Tensor> vggflow_matching_loss_fwd(const at::Tensor& v_ft, const at::Tensor& v_base,
                                                                    const at::Tensor& reward_grad,
                                                                    const at::Tensor& value_out, const at::Tensor& t,
                                                                    double beta, int64_t eta_mode, bool compute_grad) {
  FK_CHECK_PRIMARY(v_ft);
  FK_CHECK_LIKE(v_base, v_ft);
  FK_CHECK_LIKE(reward_grad, v_ft);
  FK_CHECK_LIKE(value_out, v_ft);
  FK_CHECK_COEF(t, v_ft);
  TORCH_CHECK(eta_mode >= 0 && eta_mode <= 2, "eta_mode must be 0 (quad), 1 (linear) or 2 (constant)");
  return FK_DISPATCH(v_ft, vggflow_matching_loss, v_ft, v_base, reward_grad, value_out, t, beta, eta_mode,
                     compute_grad);
}

// ---- reward_grad_clip (M8) ----
static std::tuple<at::Tensor, at::Tensor> reward_grad_clip_fwd(const at::Tensor& grad, double tau) {
  FK_CHECK_PRIMARY(grad);
  TORCH_CHECK(std::isfinite(tau) && tau > 0, "tau must be a positive finite float, got ", tau);
  return FK_DISPATCH(grad, reward_grad_clip, grad, tau);
}

// ---- adjoint_matching_loss (M26, M28, M32) ----
static std::tuple<at::Tensor, at::Tensor> adjoint_matching_loss_fwd(const at::Tensor& v_ft, const at::Tensor& v_base,
                                                                    const at::Tensor& adjoint,
                                                                    const std::optional<at::Tensor>& sigma_opt,
                                                                    double lam, double p, int64_t mode, double lct,
                                                                    bool compute_grad) {
  FK_CHECK_PRIMARY(v_ft);
  FK_CHECK_LIKE(v_base, v_ft);
  FK_CHECK_LIKE(adjoint, v_ft);
  TORCH_CHECK(mode >= 0 && mode <= 2, "mode must be 0 (elementwise), 1 (norm) or 2 (memoryless), got ", mode);
  TORCH_CHECK(std::isfinite(lam) && lam > 0, "lam must be a positive finite float, got ", lam);
  TORCH_CHECK(std::isfinite(p) && p > 1, "p must be a finite float > 1, got ", p);
  at::Tensor sigma;
  if (mode == 2) {
    TORCH_CHECK(sigma_opt.has_value() && sigma_opt->defined(), "sigma is required in memoryless mode");
    sigma = *sigma_opt;
    FK_CHECK_COEF(sigma, v_ft);
    TORCH_CHECK(!std::isnan(lct) && lct > 0, "lct must be > 0 (inf disables the clamp), got ", lct);
  }
  return FK_DISPATCH(v_ft, adjoint_matching_loss, v_ft, v_base, adjoint, sigma, lam, p, mode, lct, compute_grad);
}

// ---- consistency_probes (M20) ----
static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> consistency_probes_fwd(
    const at::Tensor& x, const at::Tensor& v_base, const at::Tensor& value_out, const at::Tensor& reward_grad,
    const at::Tensor& t, double beta, int64_t eta_mode, double eps_x) {
  FK_CHECK_PRIMARY(x);
  FK_CHECK_LIKE(v_base, x);
  FK_CHECK_LIKE(value_out, x);
  FK_CHECK_LIKE(reward_grad, x);
  FK_CHECK_COEF(t, x);
  TORCH_CHECK(eta_mode >= 0 && eta_mode <= 2, "eta_mode must be 0 (quad), 1 (linear) or 2 (constant)");
  TORCH_CHECK(std::isfinite(eps_x) && eps_x > 0, "eps_x must be a positive finite float, got ", eps_x);
  return FK_DISPATCH(x, consistency_probes, x, v_base, value_out, reward_grad, t, beta, eta_mode, eps_x);
}

// ---- consistency_residual (M17, M18, M20) and consistency_residual_exact (M21) ----
static std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_residual_fwd(
    const at::Tensor& c, const at::Tensor& c_t, const at::Tensor& c_x, const at::Tensor& ghat, const at::Tensor& ghat_t,
    const at::Tensor& ghat_x, const at::Tensor& vb, const at::Tensor& vb_G, const at::Tensor& t, double beta,
    int64_t eta_mode, double eps_t, double eps_x, const at::Tensor& rho_w, const at::Tensor& rho_G,
    const at::Tensor& mask, bool compute_grad) {
  FK_CHECK_PRIMARY(c);
  FK_CHECK_LIKE(c_t, c);
  FK_CHECK_LIKE(c_x, c);
  FK_CHECK_LIKE(ghat, c);
  FK_CHECK_LIKE(ghat_t, c);
  FK_CHECK_LIKE(ghat_x, c);
  FK_CHECK_LIKE(vb, c);
  FK_CHECK_LIKE(vb_G, c);
  FK_CHECK_COEF(t, c);
  FK_CHECK_COEF(rho_w, c);
  FK_CHECK_COEF(rho_G, c);
  FK_CHECK_COEF(mask, c);
  TORCH_CHECK(eta_mode >= 0 && eta_mode <= 2, "eta_mode must be 0 (quad), 1 (linear) or 2 (constant)");
  TORCH_CHECK(std::isfinite(eps_t) && eps_t > 0, "eps_t must be a positive finite float, got ", eps_t);
  TORCH_CHECK(std::isfinite(eps_x) && eps_x > 0, "eps_x must be a positive finite float, got ", eps_x);
  return FK_DISPATCH(c, consistency_residual, c, c_t, c_x, ghat, ghat_t, ghat_x, vb, vb_G, t, beta, eta_mode, eps_t,
                     eps_x, rho_w, rho_G, mask, compute_grad);
}

static std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_residual_bwd(
    const at::Tensor& grad_cons, const at::Tensor& grad_bnd, const at::Tensor& q, const at::Tensor& c,
    const at::Tensor& t, const at::Tensor& rho_w, const at::Tensor& mask, double eps_t, double eps_x, bool need_c,
    bool need_c_t, bool need_c_x) {
  FK_CHECK_PRIMARY(c);
  const auto acc_type = c.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  FK_CHECK_CONTIGUOUS(q);
  FK_CHECK_SAME_DEVICE(q, c);
  FK_CHECK_SAME_SHAPE(q, c);
  TORCH_CHECK(q.scalar_type() == acc_type, "q must be float32 (float64 for float64 c), got ", q.scalar_type());
  for (const at::Tensor* g : {&grad_cons, &grad_bnd}) {
    FK_CHECK_SAME_DEVICE(*g, c);
    TORCH_CHECK(g->dim() == 0 && g->scalar_type() == acc_type, "grad_cons, grad_bnd must be 0-dim ", acc_type);
  }
  FK_CHECK_COEF(t, c);
  FK_CHECK_COEF(rho_w, c);
  FK_CHECK_COEF(mask, c);
  TORCH_CHECK(std::isfinite(eps_t) && eps_t > 0, "eps_t must be a positive finite float, got ", eps_t);
  TORCH_CHECK(std::isfinite(eps_x) && eps_x > 0, "eps_x must be a positive finite float, got ", eps_x);
  return FK_DISPATCH(c, consistency_residual_backward, grad_cons, grad_bnd, q, c, t, rho_w, mask, eps_t, eps_x, need_c,
                     need_c_t, need_c_x);
}

static std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_residual_exact_fwd(const at::Tensor& dG,
                                                                                     const at::Tensor& t3,
                                                                                     const at::Tensor& c,
                                                                                     const at::Tensor& mask,
                                                                                     bool compute_grad) {
  FK_CHECK_PRIMARY(dG);
  FK_CHECK_LIKE(t3, dG);
  FK_CHECK_LIKE(c, dG);
  FK_CHECK_COEF(mask, dG);
  return FK_DISPATCH(dG, consistency_residual_exact, dG, t3, c, mask, compute_grad);
}

// ---- cfg_euler (M5, M2, M6, M30) and adjoint_step (M23, M25, M31) ----
// Velocity-like tensors (v_uncond, v_cond, VJPs) and state-like ones (x, noise, a) may differ in dtype (see
// flowkern::dispatch_velocity_state); [B] coefficients are in the state's accumulation type.
static void fk_check_step_coef(const char* name, const at::Tensor& c, const at::Tensor& ref, int64_t batch,
                               at::ScalarType state_type) {
  const auto acc_type = state_type == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(c.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(c.device() == ref.device(), name, " is on ", c.device(), " but the inputs are on ", ref.device());
  TORCH_CHECK(c.dim() == 1 && c.size(0) == batch, name, " must have shape [B]=[", batch, "], got ", c.sizes());
  TORCH_CHECK(c.scalar_type() == acc_type, name, " must be ", acc_type, ", got ", c.scalar_type());
}

static void fk_check_step_optional(const char* name, const std::optional<at::Tensor>& x, const at::Tensor& ref,
                                   bool shape_like_ref, std::optional<at::ScalarType> dtype) {
  if (!x) return;
  FK_CHECK_FLOATING(*x);
  TORCH_CHECK(x->is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(x->device() == ref.device(), name, " is on ", x->device(), " but the inputs are on ", ref.device());
  TORCH_CHECK(!shape_like_ref || x->sizes() == ref.sizes(), name, " has shape ", x->sizes(), ", expected ",
              ref.sizes());
  TORCH_CHECK(!dtype || x->scalar_type() == *dtype, name, " must be ", *dtype, ", got ", x->scalar_type());
}

static std::tuple<at::Tensor, at::Tensor, at::Tensor> cfg_euler_fwd(
    const std::optional<at::Tensor>& v_uncond, const at::Tensor& v_cond, const at::Tensor& x, const at::Tensor& w,
    const at::Tensor& h, const at::Tensor& t, const std::optional<at::Tensor>& kappa,
    const std::optional<at::Tensor>& sigma, const std::optional<at::Tensor>& noise, int64_t mode) {
  FK_CHECK_PRIMARY(x);
  FK_CHECK_FLOATING(v_cond);
  FK_CHECK_CONTIGUOUS(v_cond);
  FK_CHECK_SAME_DEVICE(v_cond, x);
  FK_CHECK_SAME_SHAPE(v_cond, x);
  fk_check_step_optional("v_uncond", v_uncond, x, true, v_cond.scalar_type());
  fk_check_step_optional("noise", noise, x, true, x.scalar_type());
  TORCH_CHECK(mode == 0 || mode == 1, "mode must be 0 (ode) or 1 (memoryless), got ", mode);
  TORCH_CHECK(mode == 0 || (kappa && sigma && noise), "mode 1 (memoryless) needs kappa, sigma and noise");
  const int64_t batch = x.size(0);
  fk_check_step_coef("w", w, x, batch, x.scalar_type());
  fk_check_step_coef("h", h, x, batch, x.scalar_type());
  fk_check_step_coef("t", t, x, batch, x.scalar_type());
  if (mode == 1) {
    fk_check_step_coef("kappa", *kappa, x, batch, x.scalar_type());
    fk_check_step_coef("sigma", *sigma, x, batch, x.scalar_type());
  }
  return FK_DISPATCH(x, cfg_euler, v_uncond, v_cond, x, w, h, t, kappa, sigma, noise, mode);
}

static std::tuple<at::Tensor, at::Tensor, at::Tensor> cfg_euler_bwd(
    const std::optional<at::Tensor>& grad_v, const std::optional<at::Tensor>& grad_next,
    const std::optional<at::Tensor>& grad_hat, const at::Tensor& w, const at::Tensor& h, const at::Tensor& t,
    const std::optional<at::Tensor>& kappa, int64_t mode, bool stopgrad_xhat, bool need_uncond, bool need_cond,
    bool need_x, at::ScalarType velocity_type, at::ScalarType state_type) {
  TORCH_CHECK(grad_v || grad_next || grad_hat, "cfg_euler_bwd needs at least one of grad_v, grad_next, grad_hat");
  const at::Tensor& like = grad_v ? *grad_v : (grad_next ? *grad_next : *grad_hat);
  TORCH_CHECK(like.dim() >= 1 && like.size(0) > 0, "the gradients must have a non-empty batch dimension");
  fk_check_step_optional("grad_v", grad_v, like, true, velocity_type);
  fk_check_step_optional("grad_next", grad_next, like, true, state_type);
  fk_check_step_optional("grad_hat", grad_hat, like, true, state_type);
  TORCH_CHECK(mode == 0 || mode == 1, "mode must be 0 (ode) or 1 (memoryless), got ", mode);
  TORCH_CHECK(mode == 0 || kappa, "mode 1 (memoryless) needs kappa");
  const int64_t batch = like.size(0);
  fk_check_step_coef("w", w, like, batch, state_type);
  fk_check_step_coef("h", h, like, batch, state_type);
  fk_check_step_coef("t", t, like, batch, state_type);
  if (mode == 1) fk_check_step_coef("kappa", *kappa, like, batch, state_type);
  return FK_DISPATCH(like, cfg_euler_backward, grad_v, grad_next, grad_hat, w, h, t, kappa, mode, stopgrad_xhat,
                     need_uncond, need_cond, need_x, velocity_type, state_type);
}

static std::tuple<at::Tensor, at::Tensor> adjoint_step_fwd(const at::Tensor& a, const at::Tensor& vjp_u,
                                                           const std::optional<at::Tensor>& vjp_c, const at::Tensor& h,
                                                           const std::optional<at::Tensor>& w,
                                                           const std::optional<at::Tensor>& kappa, int64_t mode,
                                                           bool return_cot) {
  FK_CHECK_PRIMARY(a);
  FK_CHECK_FLOATING(vjp_u);
  FK_CHECK_CONTIGUOUS(vjp_u);
  FK_CHECK_SAME_DEVICE(vjp_u, a);
  FK_CHECK_SAME_SHAPE(vjp_u, a);
  fk_check_step_optional("vjp_c", vjp_c, a, true, vjp_u.scalar_type());
  TORCH_CHECK(mode == 0 || mode == 1, "mode must be 0 (ode) or 1 (memoryless), got ", mode);
  TORCH_CHECK(!vjp_c || w, "w is required with vjp_c");
  TORCH_CHECK(mode == 0 || kappa, "mode 1 (memoryless) needs kappa");
  const int64_t batch = a.size(0);
  fk_check_step_coef("h", h, a, batch, a.scalar_type());
  if (vjp_c) fk_check_step_coef("w", *w, a, batch, a.scalar_type());
  if (mode == 1) fk_check_step_coef("kappa", *kappa, a, batch, a.scalar_type());
  return FK_DISPATCH(a, adjoint_step, a, vjp_u, vjp_c, h, w, kappa, mode, return_cot);
}

static std::tuple<at::Tensor, at::Tensor, at::Tensor> adjoint_step_bwd(
    const std::optional<at::Tensor>& grad_a_new, const std::optional<at::Tensor>& grad_cot, const at::Tensor& h,
    const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& kappa, int64_t mode, bool cfg, bool need_a,
    bool need_u, bool need_c, at::ScalarType velocity_type, at::ScalarType state_type) {
  TORCH_CHECK(grad_a_new || grad_cot, "adjoint_step_bwd needs grad_a_new or grad_cot");
  TORCH_CHECK(h.dim() == 1 && h.size(0) > 0, "h must have shape [B] with B > 0");
  const int64_t batch = h.size(0), copies = cfg ? 2 : 1;
  const at::Tensor& like = grad_a_new ? *grad_a_new : *grad_cot;
  fk_check_step_optional("grad_a_new", grad_a_new, like, false, state_type == at::kDouble ? at::kDouble : at::kFloat);
  fk_check_step_optional("grad_cot", grad_cot, like, false, velocity_type);
  TORCH_CHECK(!grad_a_new || (grad_a_new->dim() >= 1 && grad_a_new->size(0) == batch), "grad_a_new must have shape [B=",
              batch, ", ...], got ", grad_a_new->sizes());
  TORCH_CHECK(!grad_cot || (grad_cot->dim() >= 1 && grad_cot->size(0) == copies * batch), "grad_cot must have shape [",
              copies * batch, ", ...], got ", grad_cot->sizes());
  TORCH_CHECK(!grad_a_new || !grad_cot || grad_cot->sizes().slice(1) == grad_a_new->sizes().slice(1),
              "grad_cot and grad_a_new differ beyond the batch dimension");
  TORCH_CHECK(mode == 0 || mode == 1, "mode must be 0 (ode) or 1 (memoryless), got ", mode);
  TORCH_CHECK(!cfg || w, "w is required with cfg");
  TORCH_CHECK(mode == 0 || kappa, "mode 1 (memoryless) needs kappa");
  TORCH_CHECK(cfg || !need_c, "need_c requires cfg");
  fk_check_step_coef("h", h, like, batch, state_type);
  if (cfg) fk_check_step_coef("w", *w, like, batch, state_type);
  if (mode == 1) fk_check_step_coef("kappa", *kappa, like, batch, state_type);
  return FK_DISPATCH(like, adjoint_step_backward, grad_a_new, grad_cot, h, w, kappa, mode, cfg, need_a, need_u,
                     need_c, velocity_type, state_type);
}

// @@functions (one block per op above this line)

PYBIND11_MODULE(_C, m) {
  m.doc() = "flowkern fused-op kernels (C++ CPU and, when built with CUDA, CUDA)";
#ifdef FLOWKERN_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.def("vggflow_matching_loss_fwd", &vggflow_matching_loss_fwd, py::call_guard<py::gil_scoped_release>());
  m.def("reward_grad_clip_fwd", &reward_grad_clip_fwd, py::call_guard<py::gil_scoped_release>());
  m.def("adjoint_matching_loss_fwd", &adjoint_matching_loss_fwd, py::call_guard<py::gil_scoped_release>());
  m.def("consistency_probes_fwd", &consistency_probes_fwd, py::call_guard<py::gil_scoped_release>());
  m.def("consistency_residual_fwd", &consistency_residual_fwd, py::call_guard<py::gil_scoped_release>());
  m.def("consistency_residual_bwd", &consistency_residual_bwd, py::call_guard<py::gil_scoped_release>());
  m.def("consistency_residual_exact_fwd", &consistency_residual_exact_fwd, py::call_guard<py::gil_scoped_release>());
  m.def("cfg_euler_fwd", &cfg_euler_fwd, py::call_guard<py::gil_scoped_release>());
  m.def("cfg_euler_bwd", &cfg_euler_bwd, py::call_guard<py::gil_scoped_release>());
  m.def("adjoint_step_fwd", &adjoint_step_fwd, py::call_guard<py::gil_scoped_release>());
  m.def("adjoint_step_bwd", &adjoint_step_bwd, py::call_guard<py::gil_scoped_release>());
  // @@defs (one m.def block per op)
}
