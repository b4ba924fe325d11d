// reward_grad_clip (M8): declarations of the CPU and CUDA entry points.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace flowkern {
namespace cpu {
// Returns (ghat like grad, norms [B] fp32/fp64). grad [B,...] contiguous; tau > 0.
std::tuple<at::Tensor, at::Tensor> reward_grad_clip(const at::Tensor& grad, double tau);
}  // namespace cpu
namespace cuda {
std::tuple<at::Tensor, at::Tensor> reward_grad_clip(const at::Tensor& grad, double tau);
}  // namespace cuda
}  // namespace flowkern
