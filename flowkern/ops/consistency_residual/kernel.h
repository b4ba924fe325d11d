// consistency_residual (M17, M18, M20) and its exact entry (M21): the kernels' entry points, defined for CPU in
// cpu.cpp and for CUDA in cuda.cu and called by op.cpp after the argument checks. All [B,...] inputs contiguous and of
// one dtype T; the cotangents are 0-dim tensors in acc_t<T> (fp32, fp64 for T = double).
#pragma once
#include <c10/core/DeviceType.h>

#include <tuple>

#include "flowkern/ops/consistency_residual/args.h"  // args::ConsistencyResidual{,Backward,Exact}, from the schemas

namespace flowkern {
// Returns (L_cons, L_bnd, q = 2R/D in acc_t<T>, or empty without compute_grad).
template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_consistency_residual(const args::ConsistencyResidual& a);
// Returns (grad_c, grad_c_t, grad_c_x) in T, each empty unless requested.
template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_consistency_residual_backward(
    const args::ConsistencyResidualBackward& a);
// Returns (L_cons, L_bnd, dL_cons/ddG in T, or empty without compute_grad).
template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_consistency_residual_exact(const args::ConsistencyResidualExact& a);
}  // namespace flowkern
