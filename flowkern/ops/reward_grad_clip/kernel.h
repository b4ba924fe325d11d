// reward_grad_clip (M8): the kernels' entry point, defined for CPU in cpu.cpp and for CUDA in cuda.cu and called by
// op.cpp after the argument checks (grad contiguous, tau > 0). Returns (ghat like grad, norms [B] fp32/fp64).
#pragma once
#include <c10/core/DeviceType.h>

#include <tuple>

#include "flowkern/ops/reward_grad_clip/args.h"  // args::RewardGradClip, generated from SCHEMA

namespace flowkern {
template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> run_reward_grad_clip(const args::RewardGradClip& a);
}  // namespace flowkern
