// vggflow_matching_loss (M16): declarations of the CPU and CUDA entry points.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace flowkern {
namespace cpu {
// Returns (loss [] fp32/fp64, grad wrt v_ft like v_ft or empty). All [B,...] inputs contiguous, one dtype.
std::tuple<at::Tensor, at::Tensor> vggflow_matching_loss(const at::Tensor& v_ft, const at::Tensor& v_base,
                                                         const at::Tensor& reward_grad, const at::Tensor& value_out,
                                                         const at::Tensor& t, double beta, int64_t eta_mode,
                                                         bool compute_grad);
}  // namespace cpu
namespace cuda {
std::tuple<at::Tensor, at::Tensor> vggflow_matching_loss(const at::Tensor& v_ft, const at::Tensor& v_base,
                                                         const at::Tensor& reward_grad, const at::Tensor& value_out,
                                                         const at::Tensor& t, double beta, int64_t eta_mode,
                                                         bool compute_grad);
}  // namespace cuda
}  // namespace flowkern
