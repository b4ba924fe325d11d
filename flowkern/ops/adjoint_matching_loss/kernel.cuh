// adjoint_matching_loss (M26, M28, M32) CUDA kernels, torch-free. Blocks work on fixed (sample, chunk) tiles.
// elementwise: control kernel only: diff = v_ft - v_base - u*, partial[tile] = sum diff^2, grad = 2 diff / D (4D).
// norm: reduce kernel (sum (a/lam)^2 per tile; its last block forms ||omega_b||^2 in chunk order), control (5D).
// memoryless: reduce kernel (sum d^2 per tile; its last block forms s_b and the loss), gradient kernel (7D); samples
//   of <= kChunk elements: one fused block per sample whose second read hits L1/L2 (4D), one launch.
// Losses are finished by each launch's last block (atomic ticket, partials summed in index order): no ATen tail.
// 16-byte loads when every pointer is aligned and d % Pack<T>::N == 0, scalar otherwise.
#pragma once
#include <type_traits>

#include "flowkern/coef.h"
#include "flowkern/cuda_common.cuh"

namespace flowkern {
namespace cuda {

// the modes of adjoint_matching_mode (kernel.h)
constexpr int kAmElementwise = 0, kAmNorm = 1, kAmMemoryless = 2;

template <typename A>
__device__ __forceinline__ A am_pow(A x, A e) {
  if constexpr (std::is_same_v<A, float>) return powf(x, e);
  else return pow(x, e);
}

// u* of (M26). elementwise: -a/lam (p = 2) or -sign(a)|a/lam|^exponent; norm: -(a/lam) * factor_b.
template <int kMode, typename A>
__device__ __forceinline__ A am_control(A a, A lam, A exponent, A factor, bool p2) {
  const A omega = a / lam;
  if constexpr (kMode == kAmNorm) {
    return -omega * factor;
  } else {
    if (p2) return -omega;
    const A mag = am_pow(omega < A(0) ? -omega : omega, exponent);
    return omega < A(0) ? mag : -mag;
  }
}

// d of (M32).
template <typename A>
__device__ __forceinline__ A am_residual(A v_ft, A v_base, A a, A two_over_sigma, A sigma) {
  return two_over_sigma * (v_ft - v_base) + sigma * a;
}

// Block sum of d^2 over [base, base + n) (every thread gets it).
template <typename T, bool kVec>
__device__ __forceinline__ acc_t<T> am_block_residual_sumsq(const T* __restrict__ v_ft, const T* __restrict__ v_base,
                                                            const T* __restrict__ adj, int64_t base, int64_t n,
                                                            acc_t<T> sigma) {
  using A = acc_t<T>;
  const A two_over_sigma = A(2) / sigma;
  A acc = 0;
  if constexpr (kVec) {
    constexpr int N = Pack<T>::N;
    for (int64_t i = threadIdx.x * N; i < n; i += kThreads * N) {  // n % N == 0, so no partial packs
      const Pack<T> f = load_pack(v_ft + base + i), g = load_pack(v_base + base + i), a = load_pack(adj + base + i);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A x = am_residual(to_acc(f.v[k]), to_acc(g.v[k]), to_acc(a.v[k]), two_over_sigma, sigma);
        acc += x * x;
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const int64_t j = base + i;
      const A x = am_residual(to_acc(v_ft[j]), to_acc(v_base[j]), to_acc(adj[j]), two_over_sigma, sigma);
      acc += x * x;
    }
  }
  return block_sum(acc);
}

// grad[base, base + n) = coef * d; coef == 0 (clamped sample) stores zeros without reading.
template <typename T, bool kVec>
__device__ __forceinline__ void am_block_residual_grad(const T* __restrict__ v_ft, const T* __restrict__ v_base,
                                                       const T* __restrict__ adj, T* __restrict__ grad, int64_t base,
                                                       int64_t n, acc_t<T> sigma, acc_t<T> coef) {
  using A = acc_t<T>;
  const A two_over_sigma = A(2) / sigma;
  if constexpr (kVec) {
    constexpr int N = Pack<T>::N;
    for (int64_t i = threadIdx.x * N; i < n; i += kThreads * N) {
      Pack<T> out;
      if (coef == A(0)) {
#pragma unroll
        for (int k = 0; k < N; ++k) out.v[k] = from_acc<T>(A(0));
      } else {
        const Pack<T> f = load_pack(v_ft + base + i), g = load_pack(v_base + base + i), a = load_pack(adj + base + i);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          const A x = am_residual(to_acc(f.v[k]), to_acc(g.v[k]), to_acc(a.v[k]), two_over_sigma, sigma);
          out.v[k] = from_acc<T>(coef * x);
        }
      }
      store_pack(grad + base + i, out);
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const int64_t j = base + i;
      grad[j] = coef == A(0) ? from_acc<T>(A(0))
                             : from_acc<T>(coef * am_residual(to_acc(v_ft[j]), to_acc(v_base[j]), to_acc(adj[j]),
                                                              two_over_sigma, sigma));
    }
  }
}

// Per (sample, chunk) tile: partial[tile] = sum (a/lam)^2 (kMode = kAmNorm) or sum d^2 (kAmMemoryless).
template <typename T, bool kVec, int kMode>
__global__ void __launch_bounds__(kThreads)
    adjoint_matching_reduce_kernel(const T* __restrict__ v_ft, const T* __restrict__ v_base, const T* __restrict__ adj,
                                   Coef<acc_t<T>> sigma, acc_t<T>* __restrict__ partial, unsigned* __restrict__ counter,
                                   acc_t<T>* __restrict__ sums, acc_t<T>* __restrict__ loss, int64_t d, int64_t chunks,
                                   int64_t batch, acc_t<T> lam, acc_t<T> lct) {
  using A = acc_t<T>;
  const int64_t tile = blockIdx.x, b = tile / chunks, start = (tile % chunks) * kChunk;
  const int64_t n = min(kChunk, d - start), base = b * d + start;
  A acc = 0;
  if constexpr (kMode == kAmNorm) {
    if constexpr (kVec) {
      constexpr int N = Pack<T>::N;
      for (int64_t i = threadIdx.x * N; i < n; i += kThreads * N) {
        const Pack<T> a = load_pack(adj + base + i);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          const A w = to_acc(a.v[k]) / lam;
          acc += w * w;
        }
      }
    } else {
      for (int64_t i = threadIdx.x; i < n; i += kThreads) {
        const A w = to_acc(adj[base + i]) / lam;
        acc += w * w;
      }
    }
    acc = block_sum(acc);
  } else {
    acc = am_block_residual_sumsq<T, kVec>(v_ft, v_base, adj, base, n, sigma[b]);
  }
  // the last block: per-sample sums in chunk order; memoryless also the loss (1/B) sum_b min(s_b, lct) (M32)
  if (!last_block_sample_sums(acc, partial, counter, sums, batch, chunks)) return;
  if (kMode == kAmMemoryless && threadIdx.x == 0) {
    A total = 0;
    for (int64_t s = 0; s < batch; ++s) total += min(sums[s], lct);
    *loss = total / A(batch);
  }
}

// elementwise / norm (M28): partial[tile] = sum diff^2, grad = grad_scale * diff (grad may be null).
// norm: factor_b = max(||omega_b||, norm_floor)^exponent from sums[b] = ||omega_b||^2.
template <typename T, bool kVec, int kMode>
__global__ void __launch_bounds__(kThreads)
    adjoint_matching_control_kernel(const T* __restrict__ v_ft, const T* __restrict__ v_base,
                                    const T* __restrict__ adj, const acc_t<T>* __restrict__ sums,
                                    T* __restrict__ grad, acc_t<T>* __restrict__ partial, unsigned* __restrict__ counter,
                                    acc_t<T>* __restrict__ loss, int64_t d, int64_t chunks, acc_t<T> lam,
                                    acc_t<T> exponent, acc_t<T> norm_floor, acc_t<T> grad_scale, acc_t<T> loss_scale,
                                    bool p2) {
  using A = acc_t<T>;
  const int64_t tile = blockIdx.x, b = tile / chunks, start = (tile % chunks) * kChunk;
  const int64_t n = min(kChunk, d - start), base = b * d + start;
  A factor = 1;
  if constexpr (kMode == kAmNorm) factor = am_pow(max(sqrt(sums[b]), norm_floor), exponent);
  A acc = 0;
  if constexpr (kVec) {
    constexpr int N = Pack<T>::N;
    for (int64_t i = threadIdx.x * N; i < n; i += kThreads * N) {
      const Pack<T> f = load_pack(v_ft + base + i), g = load_pack(v_base + base + i), a = load_pack(adj + base + i);
      Pack<T> out;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A x = to_acc(f.v[k]) - to_acc(g.v[k]) - am_control<kMode>(to_acc(a.v[k]), lam, exponent, factor, p2);
        acc += x * x;
        out.v[k] = from_acc<T>(x * grad_scale);
      }
      if (grad != nullptr) store_pack(grad + base + i, out);
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const int64_t j = base + i;
      const A x = to_acc(v_ft[j]) - to_acc(v_base[j]) - am_control<kMode>(to_acc(adj[j]), lam, exponent, factor, p2);
      acc += x * x;
      if (grad != nullptr) grad[j] = from_acc<T>(x * grad_scale);
    }
  }
  A total;
  if (last_block_sum(block_sum(acc), partial, counter, &total) && threadIdx.x == 0) *loss = total * loss_scale;
}

// memoryless gradient (M32) per tile: 1[s_b < lct] (4/sigma_b) d / B.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    adjoint_matching_memoryless_grad_kernel(const T* __restrict__ v_ft, const T* __restrict__ v_base,
                                            const T* __restrict__ adj, Coef<acc_t<T>> sigma,
                                            const acc_t<T>* __restrict__ sums, T* __restrict__ grad, int64_t d,
                                            int64_t chunks, acc_t<T> lct, acc_t<T> batch) {
  using A = acc_t<T>;
  const int64_t tile = blockIdx.x, b = tile / chunks, start = (tile % chunks) * kChunk;
  const A s = sigma[b], coef = sums[b] < lct ? A(4) / (s * batch) : A(0);
  am_block_residual_grad<T, kVec>(v_ft, v_base, adj, grad, b * d + start, min(kChunk, d - start), s, coef);
}

// memoryless, d <= kChunk: one block per sample writes sums[b] = s_b and (grad != null) the gradient.
// s_b equals the tiled path's (one tile, same block_sum order).
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    adjoint_matching_memoryless_fused_kernel(const T* __restrict__ v_ft, const T* __restrict__ v_base,
                                             const T* __restrict__ adj, Coef<acc_t<T>> sigma,
                                             acc_t<T>* __restrict__ sums, unsigned* __restrict__ counter,
                                             acc_t<T>* __restrict__ loss, T* __restrict__ grad, int64_t d,
                                             acc_t<T> lct, acc_t<T> batch) {
  using A = acc_t<T>;
  const int64_t b = blockIdx.x;
  const A s = sigma[b];
  const A total = am_block_residual_sumsq<T, kVec>(v_ft, v_base, adj, b * d, d, s);
  if (grad != nullptr) {
    const A coef = total < lct ? A(4) / (s * batch) : A(0);
    am_block_residual_grad<T, kVec>(v_ft, v_base, adj, grad, b * d, d, s, coef);
  }
  // the loss (1/B) sum_b min(s_b, lct) in the last block, in sample order; `sums` holds the per-block values
  A clamped_total;
  if (last_block_sum(min(total, lct), sums, counter, &clamped_total) && threadIdx.x == 0) *loss = clamped_total / batch;
}

}  // namespace cuda
}  // namespace flowkern
