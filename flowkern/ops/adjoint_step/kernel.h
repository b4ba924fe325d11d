// adjoint_step (M23, M25, M31): the kernels' entry points, defined for CPU in cpu.cpp and for CUDA in cuda.cu and
// called by op.cpp after the argument checks. VJPs and cot have the velocity type TV, a the state type TX (a pair that
// `velocity_state_types` allows); a_new is in TX's accumulation type; coefficients too.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <optional>
#include <tuple>

#include "../cfg_euler/kernel.h"  // velocity_state_types, dispatch_velocity_state
#include "flowkern/checks.h"
#include "flowkern/ops/adjoint_step/args.h"  // args::AdjointStep, args::AdjointStepBackward, generated from the schemas

namespace flowkern {
// Returns (a_new, cot = [a_new; a_new] with vjp_c, a_new without, in TV; or empty unless return_cot).
template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> run_adjoint_step(const at::Tensor& a, const at::Tensor& vjp_u,
                                                    const std::optional<at::Tensor>& vjp_c, const CoefArg& h,
                                                    const CoefArg& w, const CoefArg& kappa, int64_t mode,
                                                    bool return_cot);
// Returns (d a in state_type, d vjp_u, d vjp_c in velocity_type), each [B, ...] when asked for, else empty.
template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_adjoint_step_backward(
    const std::optional<at::Tensor>& grad_a_new, const std::optional<at::Tensor>& grad_cot, int64_t batch,
    const CoefArg& h, const CoefArg& w, const CoefArg& kappa, int64_t mode, bool cfg, bool need_a, bool need_u,
    bool need_c, at::ScalarType velocity_type, at::ScalarType state_type);
}  // namespace flowkern
