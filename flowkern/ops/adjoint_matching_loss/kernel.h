// adjoint_matching_loss (M26, M28, M32): the kernels' entry point, defined for CPU in cpu.cpp and for CUDA in cuda.cu
// and called by op.cpp after the argument checks. v_ft, v_base, adjoint [B,...] contiguous, one dtype. mode: 0
// elementwise, 1 norm, 2 memoryless; sigma and lct are read in mode 2 only, lam and p in modes 0 and 1 only.
// Returns (loss [] fp32/fp64, grad wrt v_ft like v_ft or empty).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <tuple>

#include "flowkern/checks.h"

namespace flowkern {
template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> run_adjoint_matching_loss(const at::Tensor& v_ft, const at::Tensor& v_base,
                                                                const at::Tensor& adjoint, const CoefArg& sigma,
                                                                double lam, double p, int64_t mode, double lct,
                                                                bool compute_grad);
}  // namespace flowkern
