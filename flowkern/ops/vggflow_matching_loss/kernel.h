// vggflow_matching_loss (M16): the kernels' entry point, defined for CPU in cpu.cpp and for CUDA in cuda.cu and called
// by op.cpp after the argument checks (inputs contiguous; on CUDA v_ft and the targets in a pair of types that
// velocity_state_types allows). Returns (loss [] fp32/fp64, grad wrt v_ft like v_ft or empty).
#pragma once
#include <c10/core/DeviceType.h>

#include <tuple>

#include "flowkern/ops/vggflow_matching_loss/args.h"  // args::VggflowMatchingLoss, generated from SCHEMA

namespace flowkern {
template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> run_vggflow_matching_loss(const args::VggflowMatchingLoss& a);
}  // namespace flowkern
