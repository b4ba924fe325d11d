// adjoint_matching_loss (M26, M28, M32): declarations of the CPU and CUDA entry points.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace flowkern {
namespace cpu {
// Returns (loss [] fp32/fp64, grad wrt v_ft like v_ft or empty). v_ft, v_base, adjoint [B,...] contiguous, one
// dtype. mode: 0 elementwise, 1 norm, 2 memoryless; sigma ([B] fp32/fp64) and lct are read in mode 2 only
// (sigma may be undefined otherwise); lam and p in modes 0 and 1 only.
std::tuple<at::Tensor, at::Tensor> adjoint_matching_loss(const at::Tensor& v_ft, const at::Tensor& v_base,
                                                         const at::Tensor& adjoint, const at::Tensor& sigma, double lam,
                                                         double p, int64_t mode, double lct, bool compute_grad);
}  // namespace cpu
namespace cuda {
std::tuple<at::Tensor, at::Tensor> adjoint_matching_loss(const at::Tensor& v_ft, const at::Tensor& v_base,
                                                         const at::Tensor& adjoint, const at::Tensor& sigma, double lam,
                                                         double p, int64_t mode, double lct, bool compute_grad);
}  // namespace cuda
}  // namespace flowkern
