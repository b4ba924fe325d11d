// vggflow_matching_loss (M16) CUDA kernel, torch-free. One block per (sample, chunk) tile:
// diff = v_ft - v_base - beta*eta_t*ghat + c_phi; partial[tile] = sum diff^2; grad = 2*diff/D.
// One pass over memory (4R + 1W), 16-byte loads when every pointer is aligned, scalar otherwise.
#pragma once
#include "flowkern/cuda_common.cuh"

namespace flowkern {
namespace cuda {

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    vggflow_matching_loss_kernel(const T* __restrict__ v_ft, const T* __restrict__ v_base,
                                 const T* __restrict__ ghat, const T* __restrict__ value_out,
                                 const acc_t<T>* __restrict__ t, T* __restrict__ grad, acc_t<T>* __restrict__ partial,
                                 int64_t d, int64_t chunks, acc_t<T> beta, int eta_mode, acc_t<T> grad_scale) {
  using A = acc_t<T>;
  const int64_t tile = blockIdx.x, b = tile / chunks, start = (tile % chunks) * kChunk;
  const int64_t n = min(kChunk, d - start), base = b * d + start;
  const A coef = beta * eta_of(t[b], eta_mode);
  A acc = 0;
  if constexpr (kVec) {
    constexpr int N = Pack<T>::N;
    for (int64_t i = threadIdx.x * N; i < n; i += kThreads * N) {  // d % N == 0, so no partial packs
      const Pack<T> a = load_pack(v_ft + base + i), bb = load_pack(v_base + base + i);
      const Pack<T> g = load_pack(ghat + base + i), c = load_pack(value_out + base + i);
      Pack<T> out;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A x = to_acc(a.v[k]) - to_acc(bb.v[k]) - coef * to_acc(g.v[k]) + to_acc(c.v[k]);
        acc += x * x;
        out.v[k] = from_acc<T>(x * grad_scale);
      }
      if (grad != nullptr) store_pack(grad + base + i, out);
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const int64_t j = base + i;
      const A x = to_acc(v_ft[j]) - to_acc(v_base[j]) - coef * to_acc(ghat[j]) + to_acc(value_out[j]);
      acc += x * x;
      if (grad != nullptr) grad[j] = from_acc<T>(x * grad_scale);
    }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[tile] = acc;
}

}  // namespace cuda
}  // namespace flowkern
