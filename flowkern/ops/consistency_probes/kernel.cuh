// consistency_probes (M20) CUDA kernels, torch-free, plus helpers shared with consistency_residual_kernel.cuh.
// Two launches over (sample, chunk) tiles, since the per-sample rms gates the elementwise pass:
//   norms: partial[tile] = (sum w^2, sum G^2), G = c_phi - beta*eta_t*ghat (M15), w = v_base - G    (3R)
//   write: every block sums its sample's partials in the same fixed order -> rho = max(sqrt(sum/D_b), 1e-12),
//          x_w = x + (eps_x/rho_w) w, x_G = x + (eps_x/rho_G) G in fp32 (fp64 for fp64)               (4R + 2W)
// 16-byte loads when every pointer is aligned and D_b % N == 0, scalar otherwise.
#pragma once
#include "flowkern/coef.h"
#include "flowkern/cuda_common.cuh"

namespace flowkern {
namespace cuda {
namespace consistency_detail {

constexpr double kRmsFloor = 1e-12;  // rms_b floor of (M20)

// N accumulator values (a whole number of 16-byte words) to/from 16-byte-aligned memory.
template <int N, typename A>
__device__ __forceinline__ void store_acc(A* p, const A (&v)[N]) {
  static_assert((N * sizeof(A)) % 16 == 0, "whole 16-byte words");
#pragma unroll
  for (int k = 0; k < static_cast<int>(N * sizeof(A) / 16); ++k) {
    uint4 bits;
    memcpy(&bits, reinterpret_cast<const char*>(v) + 16 * k, 16);
    store16(p + k * (16 / sizeof(A)), bits);
  }
}

template <int N, typename A>
__device__ __forceinline__ void load_acc(const A* p, A (&v)[N]) {
  static_assert((N * sizeof(A)) % 16 == 0, "whole 16-byte words");
#pragma unroll
  for (int k = 0; k < static_cast<int>(N * sizeof(A) / 16); ++k) {
    reinterpret_cast<uint4*>(v)[k] = __ldg(reinterpret_cast<const uint4*>(p) + k);
  }
}

// e_b of (M20): +eps_t, or -eps_t where t + eps_t > 1 (the same test in A as every backend)
template <typename A>
__device__ __forceinline__ A signed_step(A t, A eps_t) {
  return t + eps_t <= A(1) ? eps_t : -eps_t;
}

template <typename A>
__device__ __forceinline__ A floored_rms(A sum_sq, int64_t d) {
  const A rms = sqrt(sum_sq / static_cast<A>(d));
  return rms > A(kRmsFloor) ? rms : A(kRmsFloor);
}

}  // namespace consistency_detail

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    consistency_probe_norms_kernel(const T* __restrict__ v_base, const T* __restrict__ value_out,
                                   const T* __restrict__ ghat, Coef<acc_t<T>> t,
                                   acc_t<T>* __restrict__ partial, int64_t d, int64_t chunks, acc_t<T> beta,
                                   int eta_mode) {
  using A = acc_t<T>;
  const int64_t tile = blockIdx.x, b = tile / chunks, start = (tile % chunks) * kChunk;
  const int64_t n = min(kChunk, d - start), base = b * d + start;
  const A coef = beta * eta_of(t[b], eta_mode);
  A acc_w = 0, acc_g = 0;
  if constexpr (kVec) {
    constexpr int N = Pack<T>::N;
    for (int64_t i = threadIdx.x * N; i < n; i += kThreads * N) {  // d % N == 0, so no partial packs
      const Pack<T> vb = load_pack(v_base + base + i), c = load_pack(value_out + base + i);
      const Pack<T> g = load_pack(ghat + base + i);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A big_g = to_acc(c.v[k]) - coef * to_acc(g.v[k]), w = to_acc(vb.v[k]) - big_g;
        acc_w += w * w;
        acc_g += big_g * big_g;
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const int64_t j = base + i;
      const A big_g = to_acc(value_out[j]) - coef * to_acc(ghat[j]), w = to_acc(v_base[j]) - big_g;
      acc_w += w * w;
      acc_g += big_g * big_g;
    }
  }
  acc_w = block_sum(acc_w);
  acc_g = block_sum(acc_g);
  if (threadIdx.x == 0) {
    partial[2 * tile] = acc_w;
    partial[2 * tile + 1] = acc_g;
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    consistency_probe_write_kernel(const T* __restrict__ x, const T* __restrict__ v_base,
                                   const T* __restrict__ value_out, const T* __restrict__ ghat,
                                   Coef<acc_t<T>> t, const acc_t<T>* __restrict__ partial,
                                   acc_t<T>* __restrict__ x_w, acc_t<T>* __restrict__ x_g, acc_t<T>* __restrict__ rho_w,
                                   acc_t<T>* __restrict__ rho_g, int64_t d, int64_t chunks, acc_t<T> beta, int eta_mode,
                                   acc_t<T> eps_x) {
  using A = acc_t<T>;
  using consistency_detail::floored_rms;
  const int64_t tile = blockIdx.x, b = tile / chunks, start = (tile % chunks) * kChunk;
  const int64_t n = min(kChunk, d - start), base = b * d + start;
  // every block of sample b sums the same partials in the same order: one rho per sample, batch-invariant
  A sum_w = 0, sum_g = 0;
  for (int64_t k = 0; k < chunks; ++k) {
    sum_w += partial[2 * (b * chunks + k)];
    sum_g += partial[2 * (b * chunks + k) + 1];
  }
  const A r_w = floored_rms(sum_w, d), r_g = floored_rms(sum_g, d);
  if (tile % chunks == 0 && threadIdx.x == 0) {
    rho_w[b] = r_w;
    rho_g[b] = r_g;
  }
  const A step_w = eps_x / r_w, step_g = eps_x / r_g;
  const A coef = beta * eta_of(t[b], eta_mode);
  if constexpr (kVec) {
    constexpr int N = Pack<T>::N;
    for (int64_t i = threadIdx.x * N; i < n; i += kThreads * N) {
      const Pack<T> xs = load_pack(x + base + i), vb = load_pack(v_base + base + i);
      const Pack<T> c = load_pack(value_out + base + i), g = load_pack(ghat + base + i);
      alignas(16) A out_w[N];
      alignas(16) A out_g[N];
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A big_g = to_acc(c.v[k]) - coef * to_acc(g.v[k]), w = to_acc(vb.v[k]) - big_g;
        out_w[k] = to_acc(xs.v[k]) + step_w * w;
        out_g[k] = to_acc(xs.v[k]) + step_g * big_g;
      }
      consistency_detail::store_acc<N>(x_w + base + i, out_w);
      consistency_detail::store_acc<N>(x_g + base + i, out_g);
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const int64_t j = base + i;
      const A big_g = to_acc(value_out[j]) - coef * to_acc(ghat[j]), w = to_acc(v_base[j]) - big_g;
      x_w[j] = to_acc(x[j]) + step_w * w;
      x_g[j] = to_acc(x[j]) + step_g * big_g;
    }
  }
}

}  // namespace cuda
}  // namespace flowkern
