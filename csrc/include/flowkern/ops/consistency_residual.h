// consistency_residual (M17, M18, M20) and its exact-mode entry (M21): declarations of the CPU and CUDA entry points.
// All [B,...] inputs contiguous and of one dtype T; per-sample coefficients (t, rho_w, rho_G, mask) and the
// cotangents contiguous in acc_t<T> (fp32, fp64 for T = double).
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace flowkern {
namespace cpu {
// Returns (L_cons, L_bnd, q = 2R/D in acc_t<T>, or empty without compute_grad).
std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_residual(
    const at::Tensor& c, const at::Tensor& c_t, const at::Tensor& c_x, const at::Tensor& ghat, const at::Tensor& ghat_t,
    const at::Tensor& ghat_x, const at::Tensor& vb, const at::Tensor& vb_G, const at::Tensor& t, double beta,
    int64_t eta_mode, double eps_t, double eps_x, const at::Tensor& rho_w, const at::Tensor& rho_G,
    const at::Tensor& mask, bool compute_grad);
// Returns (grad_c, grad_c_t, grad_c_x) in T, each empty unless requested; grad_cons, grad_bnd are [] tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_residual_backward(
    const at::Tensor& grad_cons, const at::Tensor& grad_bnd, const at::Tensor& q, const at::Tensor& c,
    const at::Tensor& t, const at::Tensor& rho_w, const at::Tensor& mask, double eps_t, double eps_x, bool need_c,
    bool need_c_t, bool need_c_x);
// Returns (L_cons, L_bnd, dL_cons/ddG in T, or empty without compute_grad).
std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_residual_exact(const at::Tensor& dG, const at::Tensor& t3,
                                                                          const at::Tensor& c, const at::Tensor& mask,
                                                                          bool compute_grad);
}  // namespace cpu
namespace cuda {
std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_residual(
    const at::Tensor& c, const at::Tensor& c_t, const at::Tensor& c_x, const at::Tensor& ghat, const at::Tensor& ghat_t,
    const at::Tensor& ghat_x, const at::Tensor& vb, const at::Tensor& vb_G, const at::Tensor& t, double beta,
    int64_t eta_mode, double eps_t, double eps_x, const at::Tensor& rho_w, const at::Tensor& rho_G,
    const at::Tensor& mask, bool compute_grad);
std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_residual_backward(
    const at::Tensor& grad_cons, const at::Tensor& grad_bnd, const at::Tensor& q, const at::Tensor& c,
    const at::Tensor& t, const at::Tensor& rho_w, const at::Tensor& mask, double eps_t, double eps_x, bool need_c,
    bool need_c_t, bool need_c_x);
std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_residual_exact(const at::Tensor& dG, const at::Tensor& t3,
                                                                          const at::Tensor& c, const at::Tensor& mask,
                                                                          bool compute_grad);
}  // namespace cuda
}  // namespace flowkern
