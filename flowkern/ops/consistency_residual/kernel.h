// consistency_residual (M17, M18, M20) and its exact entry (M21): the kernels' entry points, defined for CPU in
// cpu.cpp and for CUDA in cuda.cu and called by op.cpp after the argument checks. All [B,...] inputs contiguous and of
// one dtype T; the cotangents are 0-dim tensors in acc_t<T> (fp32, fp64 for T = double).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <tuple>

#include "flowkern/checks.h"

namespace flowkern {
// Returns (L_cons, L_bnd, q = 2R/D in acc_t<T>, or empty without compute_grad).
template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_consistency_residual(
    const at::Tensor& c, const at::Tensor& c_t, const at::Tensor& c_x, const at::Tensor& ghat, const at::Tensor& ghat_t,
    const at::Tensor& ghat_x, const at::Tensor& vb, const at::Tensor& vb_G, const CoefArg& t, double beta,
    int64_t eta_mode, double eps_t, double eps_x, const CoefArg& rho_w, const CoefArg& rho_G, const CoefArg& mask,
    bool compute_grad);
// Returns (grad_c, grad_c_t, grad_c_x) in T, each empty unless requested.
template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_consistency_residual_backward(
    const at::Tensor& grad_cons, const at::Tensor& grad_bnd, const at::Tensor& q, const at::Tensor& c,
    const CoefArg& t, const CoefArg& rho_w, const CoefArg& mask, double eps_t, double eps_x, bool need_c,
    bool need_c_t, bool need_c_x);
// Returns (L_cons, L_bnd, dL_cons/ddG in T, or empty without compute_grad).
template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_consistency_residual_exact(const at::Tensor& dG,
                                                                                 const at::Tensor& t3,
                                                                                 const at::Tensor& c,
                                                                                 const CoefArg& mask,
                                                                                 bool compute_grad);
}  // namespace flowkern
