// A per-sample coefficient as the kernels read it (torch-free, host and device): a [B] array, one value for every
// sample (a 0-dim tensor: stride 0), or a Python float passed by value (data == nullptr). Never a filled [B] tensor.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FK_HOST_DEVICE inline
#endif

namespace flowkern {

template <typename A>
struct Coef {
  const A* data = nullptr;  // nullptr: every sample uses `value`
  int64_t stride = 0;       // 1 for [B], 0 for a 0-dim tensor
  A value = A(0);

  FK_HOST_DEVICE A operator[](int64_t b) const { return data != nullptr ? data[b * stride] : value; }
};

}  // namespace flowkern
