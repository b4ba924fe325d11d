// adjoint_matching_loss (M26, M28, M32) CUDA kernels, torch-free. Blocks work on fixed (sample, chunk) tiles.
// elementwise: control kernel only: diff = v_ft - v_base - u*, partial[tile] = sum diff^2, grad = 2 diff / D (4D).
// norm: reduce kernel (sum (a/lam)^2 per tile; its last block forms ||omega_b||^2 in chunk order), control (5D).
// memoryless: reduce kernel (sum d^2 per tile; its last block forms s_b and the loss), gradient kernel (7D); samples
//   of <= kChunk elements: one fused block per sample whose second read hits L1/L2 (4D), one launch.
// Losses are finished by each launch's last block (atomic ticket, partials summed in index order): no ATen tail.
// v_ft and the gradient have type TV, v_base and the adjoint type TX (TV == TX, or a bf16/fp16 TV with fp32 TX: the
// methods' bf16 velocity next to fp32 targets, read without a cast copy); arithmetic in A = acc_t<TX>.
// 16-byte loads and stores when every pointer is aligned and d % group_size<TV, TX>() == 0, scalar otherwise.
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
template <typename TV, typename TX, bool kVec>
__device__ __forceinline__ acc_t<TX> am_block_residual_sumsq(const TV* __restrict__ v_ft, const TX* __restrict__ v_base,
                                                             const TX* __restrict__ adj, int64_t base, int64_t n,
                                                             acc_t<TX> sigma) {
  using A = acc_t<TX>;
  const A two_over_sigma = A(2) / sigma;
  A acc = 0;
  if constexpr (kVec) {
    constexpr int G = group_size<TV, TX>();
    for (int64_t i = threadIdx.x * G; i < n; i += kThreads * G) {  // n % G == 0, so no partial groups
      A f[G], g[G], a[G];
      load_group<G>(v_ft + base + i, f);
      load_group<G>(v_base + base + i, g);
      load_group<G>(adj + base + i, a);
#pragma unroll
      for (int k = 0; k < G; ++k) {
        const A x = am_residual(f[k], g[k], a[k], two_over_sigma, sigma);
        acc += x * x;
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const int64_t j = base + i;
      const A x = am_residual(A(to_acc(v_ft[j])), A(to_acc(v_base[j])), A(to_acc(adj[j])), two_over_sigma, sigma);
      acc += x * x;
    }
  }
  return block_sum(acc);
}

// grad[base, base + n) = coef * d; coef == 0 (clamped sample) stores zeros without reading.
template <typename TV, typename TX, bool kVec>
__device__ __forceinline__ void am_block_residual_grad(const TV* __restrict__ v_ft, const TX* __restrict__ v_base,
                                                       const TX* __restrict__ adj, TV* __restrict__ grad, int64_t base,
                                                       int64_t n, acc_t<TX> sigma, acc_t<TX> coef) {
  using A = acc_t<TX>;
  const A two_over_sigma = A(2) / sigma;
  if constexpr (kVec) {
    constexpr int G = group_size<TV, TX>();
    for (int64_t i = threadIdx.x * G; i < n; i += kThreads * G) {
      A out[G];
      if (coef == A(0)) {
#pragma unroll
        for (int k = 0; k < G; ++k) out[k] = A(0);
      } else {
        A f[G], g[G], a[G];
        load_group<G>(v_ft + base + i, f);
        load_group<G>(v_base + base + i, g);
        load_group<G>(adj + base + i, a);
#pragma unroll
        for (int k = 0; k < G; ++k) out[k] = coef * am_residual(f[k], g[k], a[k], two_over_sigma, sigma);
      }
      store_group<G>(grad + base + i, out);
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const int64_t j = base + i;
      grad[j] = coef == A(0) ? from_acc<TV>(A(0))
                             : from_acc<TV>(coef * am_residual(A(to_acc(v_ft[j])), A(to_acc(v_base[j])),
                                                               A(to_acc(adj[j])), two_over_sigma, sigma));
    }
  }
}

// Per (sample, chunk) tile: partial[tile] = sum (a/lam)^2 (kMode = kAmNorm) or sum d^2 (kAmMemoryless).
template <typename TV, typename TX, bool kVec, int kMode>
__global__ void __launch_bounds__(kThreads)
    adjoint_matching_reduce_kernel(const TV* __restrict__ v_ft, const TX* __restrict__ v_base,
                                   const TX* __restrict__ adj, Coef<acc_t<TX>> sigma, acc_t<TX>* __restrict__ partial,
                                   unsigned* __restrict__ counter, acc_t<TX>* __restrict__ sums,
                                   acc_t<TX>* __restrict__ loss, int64_t d, int64_t chunks, int64_t batch,
                                   acc_t<TX> lam, acc_t<TX> lct) {
  using A = acc_t<TX>;
  const int64_t tile = blockIdx.x, b = tile / chunks, start = (tile % chunks) * kChunk;
  const int64_t n = min(kChunk, d - start), base = b * d + start;
  A acc = 0;
  if constexpr (kMode == kAmNorm) {
    if constexpr (kVec) {
      constexpr int G = group_size<TV, TX>();
      for (int64_t i = threadIdx.x * G; i < n; i += kThreads * G) {
        A a[G];
        load_group<G>(adj + base + i, a);
#pragma unroll
        for (int k = 0; k < G; ++k) {
          const A w = a[k] / lam;
          acc += w * w;
        }
      }
    } else {
      for (int64_t i = threadIdx.x; i < n; i += kThreads) {
        const A w = A(to_acc(adj[base + i])) / lam;
        acc += w * w;
      }
    }
    acc = block_sum(acc);
  } else {
    acc = am_block_residual_sumsq<TV, TX, kVec>(v_ft, v_base, adj, base, n, sigma[b]);
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
template <typename TV, typename TX, bool kVec, int kMode>
__global__ void __launch_bounds__(kThreads)
    adjoint_matching_control_kernel(const TV* __restrict__ v_ft, const TX* __restrict__ v_base,
                                    const TX* __restrict__ adj, const acc_t<TX>* __restrict__ sums,
                                    TV* __restrict__ grad, acc_t<TX>* __restrict__ partial,
                                    unsigned* __restrict__ counter, acc_t<TX>* __restrict__ loss, int64_t d,
                                    int64_t chunks, acc_t<TX> lam, acc_t<TX> exponent, acc_t<TX> norm_floor,
                                    acc_t<TX> grad_scale, acc_t<TX> loss_scale, bool p2) {
  using A = acc_t<TX>;
  const int64_t tile = blockIdx.x, b = tile / chunks, start = (tile % chunks) * kChunk;
  const int64_t n = min(kChunk, d - start), base = b * d + start;
  A factor = 1;
  if constexpr (kMode == kAmNorm) factor = am_pow(max(sqrt(sums[b]), norm_floor), exponent);
  A acc = 0;
  if constexpr (kVec) {
    constexpr int G = group_size<TV, TX>();
    for (int64_t i = threadIdx.x * G; i < n; i += kThreads * G) {
      A f[G], g[G], a[G], out[G];
      load_group<G>(v_ft + base + i, f);
      load_group<G>(v_base + base + i, g);
      load_group<G>(adj + base + i, a);
#pragma unroll
      for (int k = 0; k < G; ++k) {
        const A x = f[k] - g[k] - am_control<kMode>(a[k], lam, exponent, factor, p2);
        acc += x * x;
        out[k] = x * grad_scale;
      }
      if (grad != nullptr) store_group<G>(grad + base + i, out);
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const int64_t j = base + i;
      const A x = A(to_acc(v_ft[j])) - A(to_acc(v_base[j])) -
                  am_control<kMode>(A(to_acc(adj[j])), lam, exponent, factor, p2);
      acc += x * x;
      if (grad != nullptr) grad[j] = from_acc<TV>(x * grad_scale);
    }
  }
  A total;
  if (last_block_sum(block_sum(acc), partial, counter, &total) && threadIdx.x == 0) *loss = total * loss_scale;
}

// memoryless gradient (M32) per tile: 1[s_b < lct] (4/sigma_b) d / B.
template <typename TV, typename TX, bool kVec>
__global__ void __launch_bounds__(kThreads)
    adjoint_matching_memoryless_grad_kernel(const TV* __restrict__ v_ft, const TX* __restrict__ v_base,
                                            const TX* __restrict__ adj, Coef<acc_t<TX>> sigma,
                                            const acc_t<TX>* __restrict__ sums, TV* __restrict__ grad, int64_t d,
                                            int64_t chunks, acc_t<TX> lct, acc_t<TX> batch) {
  using A = acc_t<TX>;
  const int64_t tile = blockIdx.x, b = tile / chunks, start = (tile % chunks) * kChunk;
  const A s = sigma[b], coef = sums[b] < lct ? A(4) / (s * batch) : A(0);
  am_block_residual_grad<TV, TX, kVec>(v_ft, v_base, adj, grad, b * d + start, min(kChunk, d - start), s, coef);
}

// memoryless, d <= kChunk: one block per sample writes sums[b] = s_b and (grad != null) the gradient.
// s_b equals the tiled path's (one tile, same block_sum order).
template <typename TV, typename TX, bool kVec>
__global__ void __launch_bounds__(kThreads)
    adjoint_matching_memoryless_fused_kernel(const TV* __restrict__ v_ft, const TX* __restrict__ v_base,
                                             const TX* __restrict__ adj, Coef<acc_t<TX>> sigma,
                                             acc_t<TX>* __restrict__ sums, unsigned* __restrict__ counter,
                                             acc_t<TX>* __restrict__ loss, TV* __restrict__ grad, int64_t d,
                                             acc_t<TX> lct, acc_t<TX> batch) {
  using A = acc_t<TX>;
  const int64_t b = blockIdx.x;
  const A s = sigma[b];
  const A total = am_block_residual_sumsq<TV, TX, kVec>(v_ft, v_base, adj, b * d, d, s);
  if (grad != nullptr) {
    const A coef = total < lct ? A(4) / (s * batch) : A(0);
    am_block_residual_grad<TV, TX, kVec>(v_ft, v_base, adj, grad, b * d, d, s, coef);
  }
  // the loss (1/B) sum_b min(s_b, lct) in the last block, in sample order; `sums` holds the per-block values
  A clamped_total;
  if (last_block_sum(min(total, lct), sums, counter, &clamped_total) && threadIdx.x == 0) *loss = clamped_total / batch;
}

}  // namespace cuda
}  // namespace flowkern
