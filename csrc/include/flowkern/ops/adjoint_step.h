// adjoint_step (M23, M25, M31): declarations of the CPU and CUDA entry points.
// mode: 0 'ode' a_new = a + h JTa (M25); 1 'memoryless' a_new = a + h(2 JTa - kappa a) (M31), with
// JTa = (1 - w) vjp_u + w vjp_c (vjp_u alone without vjp_c). Element types: vjp_u, vjp_c have the velocity type TV,
// a the state type TX (all contiguous), with TV == TX or TX fp32 and TV bf16/fp16; a_new is in TX's
// accumulation type A (fp32, fp64 for fp64); coefficients h, w, kappa contiguous [B] in A.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <optional>
#include <tuple>

#include "flowkern/ops/cfg_euler.h"  // dispatch_velocity_state

namespace flowkern {
namespace cpu {
// Returns (a_new in A, cot in TV): cot = [a_new; a_new] ([2B, ...]) with vjp_c, a_new ([B, ...]) without, or
// empty unless return_cot. w required with vjp_c, kappa with mode 1.
std::tuple<at::Tensor, at::Tensor> adjoint_step(const at::Tensor& a, const at::Tensor& vjp_u,
                                                const std::optional<at::Tensor>& vjp_c, const at::Tensor& h,
                                                const std::optional<at::Tensor>& w,
                                                const std::optional<at::Tensor>& kappa, int64_t mode, bool return_cot);
// Returns (d a in state_type, d vjp_u and d vjp_c in velocity_type), each [B, ...] when asked for, else empty.
// grad_a_new is in A, grad_cot in velocity_type ([2B, ...] with cfg); at least one is given.
std::tuple<at::Tensor, at::Tensor, at::Tensor> adjoint_step_backward(
    const std::optional<at::Tensor>& grad_a_new, const std::optional<at::Tensor>& grad_cot, const at::Tensor& h,
    const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& kappa, int64_t mode, bool cfg, bool need_a,
    bool need_u, bool need_c, at::ScalarType velocity_type, at::ScalarType state_type);
}  // namespace cpu
namespace cuda {
std::tuple<at::Tensor, at::Tensor> adjoint_step(const at::Tensor& a, const at::Tensor& vjp_u,
                                                const std::optional<at::Tensor>& vjp_c, const at::Tensor& h,
                                                const std::optional<at::Tensor>& w,
                                                const std::optional<at::Tensor>& kappa, int64_t mode, bool return_cot);
std::tuple<at::Tensor, at::Tensor, at::Tensor> adjoint_step_backward(
    const std::optional<at::Tensor>& grad_a_new, const std::optional<at::Tensor>& grad_cot, const at::Tensor& h,
    const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& kappa, int64_t mode, bool cfg, bool need_a,
    bool need_u, bool need_c, at::ScalarType velocity_type, at::ScalarType state_type);
}  // namespace cuda
}  // namespace flowkern
