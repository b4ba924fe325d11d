// adjoint_matching_loss (M26, M28, M32): the kernels' entry point, defined for CPU in cpu.cpp and for CUDA in cuda.cu
// and called by op.cpp after the argument checks (v_ft, v_base, adjoint [B,...] contiguous, one dtype). sigma and lct
// are read in mode 'memoryless' only, lam and p in the others. Returns (loss [] fp32/fp64, grad wrt v_ft like v_ft or
// empty).
#pragma once
#include <c10/core/DeviceType.h>

#include <tuple>

#include "flowkern/ops/adjoint_matching_loss/args.h"  // args::AdjointMatchingLoss, generated from SCHEMA

namespace flowkern {
constexpr int64_t kAmElementwise = 0, kAmNorm = 1, kAmMemoryless = 2;

// The mode the kernels run: 'norm' with p = 2 is 'elementwise' (||omega||^0 = 1: u* = -omega, no norm pass).
inline int64_t adjoint_matching_mode(const args::AdjointMatchingLoss& a) {
  const int64_t mode = choice("mode", a.mode, {"elementwise", "norm", "memoryless"});
  return mode == kAmNorm && a.p == 2.0 ? kAmElementwise : mode;
}

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> run_adjoint_matching_loss(const args::AdjointMatchingLoss& a);
}  // namespace flowkern
