// adjoint_step (M23, M25, M31): the kernels' entry points, defined for CPU in cpu.cpp and for CUDA in cuda.cu and
// called by op.cpp after the argument checks. VJPs and cot have the velocity type TV, a the state type TX (a pair that
// `velocity_state_types` allows); a_new is in TX's accumulation type; coefficients too.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceType.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../cfg_euler/kernel.h"  // velocity_state_types, dispatch_velocity_state
#include "flowkern/checks.h"
#include "flowkern/ops/adjoint_step/args.h"  // args::AdjointStep, args::AdjointStepBackward, generated from the schemas

namespace flowkern {
// Returns (a_new, cot = [a_new; a_new] with vjp_c, a_new without, in TV; or empty unless return_cot). op.cpp passes
// a in TX and the VJPs in TV, w unset without vjp_c and kappa unset outside 'memoryless'.
template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> run_adjoint_step(const args::AdjointStep& args);
// Returns (d a in the state type, d vjp_u, d vjp_c in the velocity type: adjoint_step_backward_types), each [B, ...]
// when asked for, else empty. op.cpp passes grad_a_new in the state's accumulation type and grad_cot in the velocity
// type, w unset without cfg and kappa unset outside 'memoryless'.
template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_adjoint_step_backward(const args::AdjointStepBackward& args);

// The backward's (velocity, state) types for its cotangents; the engine casts the gradients to the inputs' types.
inline std::pair<at::ScalarType, at::ScalarType> adjoint_step_backward_types(const args::AdjointStepBackward& args) {
  std::optional<at::ScalarType> tv, tx;
  if (args.grad_cot) tv = args.grad_cot->scalar_type();
  if (args.grad_a_new) tx = args.grad_a_new->scalar_type();
  if (!tx) tx = (*tv == at::kBFloat16 || *tv == at::kHalf) ? at::kFloat : *tv;
  if (!tv) tv = tx;
  return velocity_state_types(*tv, *tx);
}

// The backward's outputs (d a, d vjp_u, d vjp_c) in adjoint_step_backward_types, each [B, ...] when asked for, else
// empty: what the CPU and CUDA entries return.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> adjoint_step_backward_outputs(
    const args::AdjointStepBackward& args) {
  const auto [velocity_type, state_type] = adjoint_step_backward_types(args);
  const at::Tensor& like = args.grad_a_new ? *args.grad_a_new : *args.grad_cot;
  std::vector<int64_t> shape = like.sizes().vec();
  shape[0] = args.batch;
  auto out = [&](bool need, at::ScalarType type) {
    return need ? at::empty(shape, like.options().dtype(type)) : at::empty({0}, like.options().dtype(type));
  };
  return {out(args.need_a, state_type), out(args.need_u, velocity_type), out(args.need_c, velocity_type)};
}
}  // namespace flowkern
