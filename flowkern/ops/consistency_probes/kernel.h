// consistency_probes (M20): the kernels' entry point, defined for CPU in cpu.cpp and for CUDA in cuda.cu and called
// by op.cpp after the argument checks. [B,...] inputs contiguous, one dtype. Returns (x_w, x_G [B,...] fp32/fp64,
// rho_w, rho_G [B] fp32/fp64).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <tuple>

#include "flowkern/checks.h"

namespace flowkern {
template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_consistency_probes(
    const at::Tensor& x, const at::Tensor& v_base, const at::Tensor& value_out, const at::Tensor& reward_grad,
    const CoefArg& t, double beta, int64_t eta_mode, double eps_x);
}  // namespace flowkern
