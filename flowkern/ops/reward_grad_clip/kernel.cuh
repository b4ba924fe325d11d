// reward_grad_clip (M8) CUDA kernels, torch-free.
// Samples of more than kChunk elements, two launches: (1) per (sample, chunk) tile, partial[tile] = sum grad^2, and
// (2) in its last block n_b = sqrt(sum of the sample's partials in chunk order); (3) per tile,
// ghat = rho_b * grad, rho_b = min(n_b, tau)/max(n_b, 1e-12). 3D traffic.
// Samples of <= kChunk elements: one block per sample does all three; its second read of the sample
// hits L1/L2, so HBM traffic is 2D. Both give the same n_b (one chunk partial, same block_sum order).
// 16-byte loads when every pointer is aligned and d % Pack<T>::N == 0, scalar otherwise.
#pragma once
#include "flowkern/cuda_common.cuh"

namespace flowkern {
namespace cuda {

// rho of (M8).
template <typename A>
__device__ __forceinline__ A clip_factor(A norm, A tau) {
  return min(norm, tau) / max(norm, A(1e-12));
}

// Sum of squares of grad[base, base + n) over the block (every thread gets it), in fp64: a finite fp32/bf16/fp16
// gradient whose fp32 sum of squares would overflow (entries of 1e20) still gets its finite norm.
template <typename T, bool kVec>
__device__ __forceinline__ double block_sum_of_squares(const T* __restrict__ grad, int64_t base, int64_t n) {
  double acc = 0;
  if constexpr (kVec) {
    constexpr int N = Pack<T>::N;
    for (int64_t i = threadIdx.x * N; i < n; i += kThreads * N) {  // n % N == 0, so no partial packs
      const Pack<T> g = load_pack(grad + base + i);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const double x = to_acc(g.v[k]);
        acc += x * x;
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const double x = to_acc(grad[base + i]);
      acc += x * x;
    }
  }
  return block_sum(acc);
}

// out[base, base + n) = rho * grad[base, base + n).
template <typename T, bool kVec>
__device__ __forceinline__ void block_scale(const T* __restrict__ grad, T* __restrict__ out, int64_t base, int64_t n,
                                            acc_t<T> rho) {
  if constexpr (kVec) {
    constexpr int N = Pack<T>::N;
    for (int64_t i = threadIdx.x * N; i < n; i += kThreads * N) {
      const Pack<T> g = load_pack(grad + base + i);
      Pack<T> y;
#pragma unroll
      for (int k = 0; k < N; ++k) y.v[k] = from_acc<T>(to_acc(g.v[k]) * rho);
      store_pack(out + base + i, y);
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) out[base + i] = from_acc<T>(to_acc(grad[base + i]) * rho);
  }
}

// (1) one block per (sample, chunk) tile; (2) its last block forms n_b = sqrt(sum of the sample's partials) in
// chunk order (atomic ticket on `counter`, zeroed by the launcher). partial and sums in fp64.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    reward_grad_sumsq_kernel(const T* __restrict__ grad, double* __restrict__ partial, unsigned* __restrict__ counter,
                             double* __restrict__ sums, acc_t<T>* __restrict__ norms, int64_t d, int64_t chunks,
                             int64_t batch) {
  const int64_t tile = blockIdx.x, b = tile / chunks, start = (tile % chunks) * kChunk;
  const double s = block_sum_of_squares<T, kVec>(grad, b * d + start, min(kChunk, d - start));
  if (last_block_sample_sums(s, partial, counter, sums, batch, chunks) && threadIdx.x == 0) {
    for (int64_t k = 0; k < batch; ++k) norms[k] = static_cast<acc_t<T>>(sqrt(sums[k]));
  }
}

// (3) one block per (sample, chunk) tile.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    reward_grad_scale_kernel(const T* __restrict__ grad, const acc_t<T>* __restrict__ norms, T* __restrict__ out,
                             int64_t d, int64_t chunks, acc_t<T> tau) {
  const int64_t tile = blockIdx.x, b = tile / chunks, start = (tile % chunks) * kChunk;
  block_scale<T, kVec>(grad, out, b * d + start, min(kChunk, d - start), clip_factor(norms[b], tau));
}

// d <= kChunk: one block per sample.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    reward_grad_clip_fused_kernel(const T* __restrict__ grad, T* __restrict__ out, acc_t<T>* __restrict__ norms,
                                  int64_t d, acc_t<T> tau) {
  const int64_t b = blockIdx.x;
  const acc_t<T> norm = static_cast<acc_t<T>>(sqrt(block_sum_of_squares<T, kVec>(grad, b * d, d)));
  if (threadIdx.x == 0) norms[b] = norm;
  block_scale<T, kVec>(grad, out, b * d, d, clip_factor(norm, tau));
}

}  // namespace cuda
}  // namespace flowkern
