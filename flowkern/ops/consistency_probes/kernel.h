// consistency_probes (M20): the kernels' entry point, defined for CPU in cpu.cpp and for CUDA in cuda.cu and called
// by op.cpp after the argument checks ([B,...] inputs contiguous, one dtype). Returns (x_w, x_G [B,...] fp32/fp64,
// rho_w, rho_G [B] fp32/fp64).
#pragma once
#include <c10/core/DeviceType.h>

#include <tuple>

#include "flowkern/ops/consistency_probes/args.h"  // args::ConsistencyProbes, generated from SCHEMA

namespace flowkern {
template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_consistency_probes(const args::ConsistencyProbes& a);
}  // namespace flowkern
