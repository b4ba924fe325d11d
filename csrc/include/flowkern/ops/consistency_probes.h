// consistency_probes (M20): declarations of the CPU and CUDA entry points.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace flowkern {
namespace cpu {
// Returns (x_w, x_G [B,...] fp32/fp64, rho_w, rho_G [B] fp32/fp64). All [B,...] inputs contiguous, one dtype;
// t contiguous [B] in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> consistency_probes(
    const at::Tensor& x, const at::Tensor& v_base, const at::Tensor& value_out, const at::Tensor& reward_grad,
    const at::Tensor& t, double beta, int64_t eta_mode, double eps_x);
}  // namespace cpu
namespace cuda {
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> consistency_probes(
    const at::Tensor& x, const at::Tensor& v_base, const at::Tensor& value_out, const at::Tensor& reward_grad,
    const at::Tensor& t, double beta, int64_t eta_mode, double eps_x);
}  // namespace cuda
}  // namespace flowkern
