// adjoint_step (M23, M25, M31) CUDA kernels, torch-free. Same layout and rounding rules as cfg_euler_kernel.cuh
// (whose group load/store and non-contracted arithmetic helpers this file uses): grid (tiles of one sample,
// samples), 16-byte path and scalar path bit-identical. VJPs and cot have type TV, a has type TX (TV == TX, or
// bf16/fp16 TV with fp32 TX); a_new and its cotangent are A = acc_t<TX>.
// Forward 3R + 1W (2R + 1W without CFG), +2W with cot; backward reads the cotangents given, writes the gradients
// asked for.
#pragma once
#include "../cfg_euler/kernel.cuh"

namespace flowkern {
namespace cuda {

template <typename A>
struct AdjointStepCoefs {
  A h, w, one_minus_w, kappa;
};

template <bool kCfg, bool kMemoryless, typename A>
__device__ __forceinline__ A adjoint_step_element(A a, A vjp_u, A vjp_c, const AdjointStepCoefs<A>& c) {
  const A jta = kCfg ? add_rn(mul_rn(c.one_minus_w, vjp_u), mul_rn(c.w, vjp_c)) : vjp_u;  // (M5)
  if constexpr (kMemoryless) {
    return add_rn(a, mul_rn(c.h, sub_rn(mul_rn(A(2), jta), mul_rn(c.kappa, a))));  // (M31)
  } else {
    return add_rn(a, mul_rn(c.h, jta));  // (M25)
  }
}

// cot (nullptr unless asked for) = [a_new; a_new] with CFG (second copy at cot + batch*d), a_new without.
template <typename TV, typename TX, bool kCfg, bool kMemoryless, bool kVec>
__global__ void __launch_bounds__(kThreads)
    adjoint_step_kernel(const TX* __restrict__ a, const TV* __restrict__ vjp_u, const TV* __restrict__ vjp_c,
                        Coef<acc_t<TX>> h, Coef<acc_t<TX>> w,
                        Coef<acc_t<TX>> kappa, acc_t<TX>* __restrict__ a_new, TV* __restrict__ cot,
                        int64_t d, int64_t cot_half) {
  using A = acc_t<TX>;
  const int64_t b = blockIdx.y, start = static_cast<int64_t>(blockIdx.x) * kStepTile;
  const int64_t n = min(kStepTile, d - start), base = b * d + start;
  const A wb = kCfg ? w[b] : A(0);
  const AdjointStepCoefs<A> c{h[b], wb, sub_rn(A(1), wb), kMemoryless ? kappa[b] : A(0)};
  if constexpr (kVec) {
    constexpr int G = group_size<TV, TX, A>();
    for (int64_t i = threadIdx.x * G; i < n; i += kThreads * G) {  // d % G == 0: whole groups only
      A av[G], u[G], cv[G], out[G];
      load_group<G>(a + base + i, av);
      load_group<G>(vjp_u + base + i, u);
      if constexpr (kCfg) load_group<G>(vjp_c + base + i, cv);
#pragma unroll
      for (int k = 0; k < G; ++k) out[k] = adjoint_step_element<kCfg, kMemoryless>(av[k], u[k], kCfg ? cv[k] : A(0), c);
      store_group<G>(a_new + base + i, out);
      if (cot != nullptr) {
        store_group<G>(cot + base + i, out);
        if constexpr (kCfg) store_group<G>(cot + cot_half + base + i, out);
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const int64_t j = base + i;
      const A out = adjoint_step_element<kCfg, kMemoryless>(
          static_cast<A>(to_acc(a[j])), static_cast<A>(to_acc(vjp_u[j])),
          kCfg ? static_cast<A>(to_acc(vjp_c[j])) : A(0), c);
      a_new[j] = out;
      if (cot != nullptr) {
        cot[j] = from_acc<TV>(out);
        if constexpr (kCfg) cot[cot_half + j] = from_acc<TV>(out);
      }
    }
  }
}

struct AdjointStepBackwardFlags {
  bool has_ga, has_gcot, cfg, memoryless, need_a, need_u, need_c;
};

// G = 0 + g_a + g_cot[b] + g_cot[B+b]; d a = keep G, d vjp_u = coef_u G, d vjp_c = coef_c G.
template <typename TV, typename TX, bool kVec>
__global__ void __launch_bounds__(kThreads)
    adjoint_step_backward_kernel(const acc_t<TX>* __restrict__ grad_a_new, const TV* __restrict__ grad_cot,
                                 Coef<acc_t<TX>> h, Coef<acc_t<TX>> w,
                                 Coef<acc_t<TX>> kappa, TX* __restrict__ d_a, TV* __restrict__ d_u,
                                 TV* __restrict__ d_c, int64_t d, int64_t cot_half, AdjointStepBackwardFlags f) {
  using A = acc_t<TX>;
  const int64_t b = blockIdx.y, start = static_cast<int64_t>(blockIdx.x) * kStepTile;
  const int64_t n = min(kStepTile, d - start), base = b * d + start;
  const A hb = h[b];
  const A step = f.memoryless ? mul_rn(A(2), hb) : hb;  // d a_new / d JTa (M25, M31)
  const A keep = f.memoryless ? sub_rn(A(1), mul_rn(hb, kappa[b])) : A(1);
  const A coef_u = f.cfg ? mul_rn(step, sub_rn(A(1), w[b])) : step;
  const A coef_c = f.cfg ? mul_rn(step, w[b]) : A(0);
  if constexpr (kVec) {
    constexpr int G = group_size<TV, TX, A>();
    for (int64_t i = threadIdx.x * G; i < n; i += kThreads * G) {
      A g[G], part[G], out[G];
#pragma unroll
      for (int k = 0; k < G; ++k) g[k] = A(0);
      if (f.has_ga) {
        load_group<G>(grad_a_new + base + i, part);
#pragma unroll
        for (int k = 0; k < G; ++k) g[k] = add_rn(g[k], part[k]);
      }
      if (f.has_gcot) {  // cot = [a_new; a_new]: both halves flow back into a_new
        load_group<G>(grad_cot + base + i, part);
#pragma unroll
        for (int k = 0; k < G; ++k) g[k] = add_rn(g[k], part[k]);
        if (f.cfg) {
          load_group<G>(grad_cot + cot_half + base + i, part);
#pragma unroll
          for (int k = 0; k < G; ++k) g[k] = add_rn(g[k], part[k]);
        }
      }
      if (f.need_a) {
#pragma unroll
        for (int k = 0; k < G; ++k) out[k] = mul_rn(keep, g[k]);
        store_group<G>(d_a + base + i, out);
      }
      if (f.need_u) {
#pragma unroll
        for (int k = 0; k < G; ++k) out[k] = mul_rn(coef_u, g[k]);
        store_group<G>(d_u + base + i, out);
      }
      if (f.need_c) {
#pragma unroll
        for (int k = 0; k < G; ++k) out[k] = mul_rn(coef_c, g[k]);
        store_group<G>(d_c + base + i, out);
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const int64_t j = base + i;
      A g = 0;
      if (f.has_ga) g = add_rn(g, grad_a_new[j]);
      if (f.has_gcot) {
        g = add_rn(g, static_cast<A>(to_acc(grad_cot[j])));
        if (f.cfg) g = add_rn(g, static_cast<A>(to_acc(grad_cot[cot_half + j])));
      }
      if (f.need_a) d_a[j] = from_acc<TX>(mul_rn(keep, g));
      if (f.need_u) d_u[j] = from_acc<TV>(mul_rn(coef_u, g));
      if (f.need_c) d_c[j] = from_acc<TV>(mul_rn(coef_c, g));
    }
  }
}

}  // namespace cuda
}  // namespace flowkern
