// Launcher helpers (torch side of the CUDA build): map ATen dtypes to CUDA element types.
#pragma once
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace flowkern {
namespace cuda {
template <typename T> struct cuda_type { using type = T; };
template <> struct cuda_type<c10::BFloat16> { using type = __nv_bfloat16; };
template <> struct cuda_type<c10::Half> { using type = __half; };
template <typename T> using cuda_t = typename cuda_type<T>::type;
}  // namespace cuda
}  // namespace flowkern
