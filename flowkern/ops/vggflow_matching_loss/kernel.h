// vggflow_matching_loss (M16): the kernels' entry point, defined for CPU in cpu.cpp and for CUDA in cuda.cu and
// called by op.cpp after the argument checks. [B,...] inputs contiguous and of one dtype; returns (loss [] fp32/fp64,
// grad wrt v_ft like v_ft or empty).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <tuple>

#include "flowkern/checks.h"

namespace flowkern {
template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> run_vggflow_matching_loss(const at::Tensor& v_ft, const at::Tensor& v_base,
                                                                const at::Tensor& reward_grad,
                                                                const at::Tensor& value_out, const CoefArg& t,
                                                                double beta, int64_t eta_mode, bool compute_grad);
}  // namespace flowkern
