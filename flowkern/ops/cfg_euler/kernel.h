// cfg_euler (M5, M2, M6, M30): the kernels' entry points, defined for CPU in cpu.cpp and for CUDA in cuda.cu and called
// by op.cpp after the argument checks. Element types: v_uncond, v_cond have the velocity type TV, x, noise the state
// type TX (all contiguous), a pair that `velocity_state_types` allows; coefficients in TX's accumulation type (fp32,
// fp64 for fp64).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <optional>
#include <tuple>
#include <utility>

#include "flowkern/ops/cfg_euler/args.h"  // args::CfgEuler, args::CfgEulerBackward, generated from the schemas

namespace flowkern {
// Returns (v in TV, x_next in TX, x_hat1 in TX). v_uncond absent: no CFG. kappa, sigma, noise: memoryless only.
template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_cfg_euler(const args::CfgEuler& a);
// Returns (d v_uncond, d v_cond) in the velocity type and d x in the state type (cfg_euler_backward_types), each
// [B, ...] when asked for, else empty. grad_v has the velocity type, grad_next and grad_hat the state type; at least
// one of the three is given.
template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_cfg_euler_backward(const args::CfgEulerBackward& a);

// 0 'ode' x_next = x + h v (M2); 1 'memoryless' x_next = x + h(2v - kappa x) + sqrt(h) sigma noise (M30).
template <typename Args>
inline int64_t cfg_euler_mode(const Args& a) {
  return choice("mode", a.mode, {"ode", "memoryless"});
}

// The (velocity, state) element types the kernels take for these input types: equal types, or bf16/fp16
// velocities with fp32 states (model outputs next to fp32 states: read without a cast copy); any other pair is
// computed in one common type.
inline std::pair<at::ScalarType, at::ScalarType> velocity_state_types(at::ScalarType velocity, at::ScalarType state) {
  if (velocity == state || (state == at::kFloat && (velocity == at::kBFloat16 || velocity == at::kHalf))) {
    return {velocity, state};
  }
  const at::ScalarType common = velocity == at::kDouble || state == at::kDouble ? at::kDouble : at::kFloat;
  return {common, common};
}

// The kernels' (velocity, state) types for the given cotangents; the engine casts the gradients to the inputs' types.
inline std::pair<at::ScalarType, at::ScalarType> cfg_euler_backward_types(const args::CfgEulerBackward& a) {
  const at::Tensor* state = a.grad_next ? &*a.grad_next : (a.grad_hat ? &*a.grad_hat : nullptr);
  std::optional<at::ScalarType> tv, tx;
  if (a.grad_v) tv = a.grad_v->scalar_type();
  if (state) tx = common_type({state, a.grad_hat ? &*a.grad_hat : nullptr});
  if (!tv) tv = tx;
  if (!tx) tx = (*tv == at::kBFloat16 || *tv == at::kHalf) ? at::kFloat : *tv;
  return velocity_state_types(*tv, *tx);
}

// The backward's first given cotangent (its shape and device are the outputs').
inline const at::Tensor& cfg_euler_backward_like(const args::CfgEulerBackward& a) {
  return a.grad_v ? *a.grad_v : (a.grad_next ? *a.grad_next : *a.grad_hat);
}

// The backward's outputs (d v_uncond, d v_cond, d x) in cfg_euler_backward_types, each [B, ...] when asked for, else
// empty: what the CPU and CUDA entries return.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> cfg_euler_backward_outputs(const args::CfgEulerBackward& a) {
  const auto [velocity_type, state_type] = cfg_euler_backward_types(a);
  const at::Tensor& like = cfg_euler_backward_like(a);
  auto out = [&](bool need, at::ScalarType type) {
    return need ? at::empty(like.sizes(), like.options().dtype(type)) : at::empty({0}, like.options().dtype(type));
  };
  return {out(a.need_uncond, velocity_type), out(a.need_cond, velocity_type), out(a.need_x, state_type)};
}

// x as a contiguous tensor of `type`, or nullopt.
inline std::optional<at::Tensor> as_type(const std::optional<at::Tensor>& x, at::ScalarType type) {
  if (!x.has_value()) return std::nullopt;
  return as_type(*x, type);
}
}  // namespace flowkern

// ---- (velocity, state) element-type dispatch, shared by the cfg_euler and adjoint_step kernels ----
namespace flowkern {
// Calls f.template operator()<TV, TX>() with the ATen element types of the supported pairs: TV == TX, or TX fp32
// and TV bf16/fp16 (model-dtype velocities or VJPs next to fp32 states, read without a cast copy). Python
// (flowkern/ops/cfg_euler.py: ext_dtypes) casts every other combination to one dtype first.
template <typename F>
inline void dispatch_velocity_state(at::ScalarType velocity, at::ScalarType state, const char* name, F&& f) {
  if (velocity == state) {
    switch (state) {
      case at::kFloat: return f.template operator()<float, float>();
      case at::kDouble: return f.template operator()<double, double>();
      case at::kBFloat16: return f.template operator()<c10::BFloat16, c10::BFloat16>();
      case at::kHalf: return f.template operator()<c10::Half, c10::Half>();
      default: break;
    }
  } else if (state == at::kFloat && velocity == at::kBFloat16) {
    return f.template operator()<c10::BFloat16, float>();
  } else if (state == at::kFloat && velocity == at::kHalf) {
    return f.template operator()<c10::Half, float>();
  }
  TORCH_CHECK(false, name, ": unsupported (velocity, state) dtypes (", velocity, ", ", state,
              "); expected equal floating dtypes or bfloat16/float16 velocities with float32 states");
}
}  // namespace flowkern
