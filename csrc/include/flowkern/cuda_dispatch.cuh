// Launcher helpers (torch side of the CUDA build): map ATen dtypes to CUDA element types.
#pragma once
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <initializer_list>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "flowkern/cuda_common.cuh"

namespace flowkern {
namespace cuda {
template <typename T> struct cuda_type { using type = T; };
template <> struct cuda_type<c10::BFloat16> { using type = __nv_bfloat16; };
template <> struct cuda_type<c10::Half> { using type = __half; };
template <typename T> using cuda_t = typename cuda_type<T>::type;

// Element pointer of an optional tensor (nullptr when absent).
template <typename T>
inline T* opt_ptr(const std::optional<at::Tensor>& x) {
  return x ? reinterpret_cast<T*>(const_cast<void*>(x->const_data_ptr())) : nullptr;
}

// True when every non-null pointer allows 16-byte vector loads.
inline bool all_aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  return true;
}

// Grid (tiles per sample, samples) for per-sample tiled kernels; blocks never straddle samples.
inline dim3 tiled_grid(int64_t batch, int64_t d, int64_t tile) {
  TORCH_CHECK(batch <= 65535, "flowkern: batch ", batch, " exceeds the CUDA grid limit of 65535 samples");
  return dim3(static_cast<unsigned>((d + tile - 1) / tile), static_cast<unsigned>(batch));
}
}  // namespace cuda
}  // namespace flowkern
