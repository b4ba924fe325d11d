// cfg_euler (M5, M2, M6, M30) CUDA kernels, torch-free. Grid (tiles of one sample, samples): a block covers
// kStepTile elements of one sample and reads its per-sample coefficients once. One pass over memory:
// forward 3R + 3W (+1R memoryless), backward reads only the cotangents given and writes only the gradients asked for.
// Velocity-like tensors have type TV, state-like ones TX (TV == TX, or bf16/fp16 TV with fp32 TX); arithmetic in
// A = acc_t<TX>. The 16-byte path (every pointer aligned, d a multiple of the group size) and the scalar path run
// the same per-element functions with non-contracted rounded operations, so they agree bit for bit with each other
// and with the CPU kernels: results never depend on alignment, batch size or position in the batch.
#pragma once
#include "flowkern/coef.h"
#include "flowkern/cuda_common.cuh"

namespace flowkern {
namespace cuda {

// Elements of one sample per block (one 16-byte group per thread for fp32; see kThreads for the grid size).
constexpr int64_t kStepTile = 256;

// Rounded arithmetic that the compiler may not fuse into an FMA (see the file comment).
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <typename A>
struct CfgEulerCoefs {
  A w, h, one_minus_t, kappa, noise_scale;
};

template <bool kCfg, bool kMemoryless, typename A>
__device__ __forceinline__ void cfg_euler_element(A vu, A vc, A x, A noise, const CfgEulerCoefs<A>& c, A& v,
                                                  A& x_next, A& x_hat) {
  v = kCfg ? add_rn(vu, mul_rn(c.w, sub_rn(vc, vu))) : vc;  // (M5)
  if constexpr (kMemoryless) {  // (M30)
    const A drift = sub_rn(mul_rn(A(2), v), mul_rn(c.kappa, x));
    x_next = add_rn(add_rn(x, mul_rn(c.h, drift)), mul_rn(c.noise_scale, noise));
  } else {
    x_next = add_rn(x, mul_rn(c.h, v));  // (M2)
  }
  x_hat = add_rn(x, mul_rn(c.one_minus_t, v));  // (M6)
}

template <typename TV, typename TX, bool kCfg, bool kMemoryless, bool kVec>
__global__ void __launch_bounds__(kThreads)
    cfg_euler_kernel(const TV* __restrict__ v_uncond, const TV* __restrict__ v_cond, const TX* __restrict__ x,
                     const TX* __restrict__ noise, Coef<acc_t<TX>> w, Coef<acc_t<TX>> h,
                     Coef<acc_t<TX>> t, Coef<acc_t<TX>> kappa,
                     Coef<acc_t<TX>> sigma, TV* __restrict__ v_out, TX* __restrict__ next_out,
                     TX* __restrict__ hat_out, int64_t d) {
  using A = acc_t<TX>;
  const int64_t b = blockIdx.y, start = static_cast<int64_t>(blockIdx.x) * kStepTile;
  const int64_t n = min(kStepTile, d - start), base = b * d + start;
  CfgEulerCoefs<A> c{kCfg ? w[b] : A(0), h[b], sub_rn(A(1), t[b]), A(0), A(0)};
  if constexpr (kMemoryless) {
    c.kappa = kappa[b];
    c.noise_scale = mul_rn(sqrt(c.h), sigma[b]);  // IEEE sqrt (no fast math)
  }
  if constexpr (kVec) {
    constexpr int G = group_size<TV, TX>();
    for (int64_t i = threadIdx.x * G; i < n; i += kThreads * G) {  // d % G == 0: whole groups only
      A vu[G], vc[G], xv[G], xi[G], v[G], xn[G], xh[G];
      load_group<G>(v_cond + base + i, vc);
      if constexpr (kCfg) load_group<G>(v_uncond + base + i, vu);
      load_group<G>(x + base + i, xv);
      if constexpr (kMemoryless) load_group<G>(noise + base + i, xi);
#pragma unroll
      for (int k = 0; k < G; ++k) {
        cfg_euler_element<kCfg, kMemoryless>(kCfg ? vu[k] : A(0), vc[k], xv[k], kMemoryless ? xi[k] : A(0), c, v[k],
                                             xn[k], xh[k]);
      }
      store_group<G>(v_out + base + i, v);
      store_group<G>(next_out + base + i, xn);
      store_group<G>(hat_out + base + i, xh);
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const int64_t j = base + i;
      A v, xn, xh;
      cfg_euler_element<kCfg, kMemoryless>(kCfg ? static_cast<A>(to_acc(v_uncond[j])) : A(0),
                                           static_cast<A>(to_acc(v_cond[j])), static_cast<A>(to_acc(x[j])),
                                           kMemoryless ? static_cast<A>(to_acc(noise[j])) : A(0), c, v, xn, xh);
      v_out[j] = from_acc<TV>(v);
      next_out[j] = from_acc<TX>(xn);
      hat_out[j] = from_acc<TX>(xh);
    }
  }
}

// Which cotangents are given and which gradients are asked for (uniform per launch).
struct CfgEulerBackwardFlags {
  bool has_gv, has_gn, has_gh, xhat_grad, memoryless, need_u, need_c, need_x;
};

template <typename A>
struct CfgEulerBackwardCoefs {
  A w, one_minus_w, step, one_minus_t, keep;  // step = d x_next/d v, keep = d x_next/d x
};

// gbar = 0 + g_v + step g_n + (1-t) g_h; d v_c = w gbar; d v_u = (1-w) gbar; d x = 0 + keep g_n + g_h.
template <typename A>
__device__ __forceinline__ void cfg_euler_backward_element(A gv, A gn, A gh, const CfgEulerBackwardCoefs<A>& c,
                                                           const CfgEulerBackwardFlags& f, A& du, A& dc, A& dx) {
  A gbar = 0;
  if (f.has_gv) gbar = add_rn(gbar, gv);
  if (f.has_gn) gbar = add_rn(gbar, mul_rn(c.step, gn));
  if (f.has_gh && f.xhat_grad) gbar = add_rn(gbar, mul_rn(c.one_minus_t, gh));
  dc = mul_rn(c.w, gbar);
  du = mul_rn(c.one_minus_w, gbar);
  A gx = 0;
  if (f.has_gn) gx = add_rn(gx, mul_rn(c.keep, gn));
  if (f.has_gh) gx = add_rn(gx, gh);
  dx = gx;
}

template <typename TV, typename TX, bool kVec>
__global__ void __launch_bounds__(kThreads)
    cfg_euler_backward_kernel(const TV* __restrict__ grad_v, const TX* __restrict__ grad_next,
                              const TX* __restrict__ grad_hat, Coef<acc_t<TX>> w,
                              Coef<acc_t<TX>> h, Coef<acc_t<TX>> t,
                              Coef<acc_t<TX>> kappa, TV* __restrict__ d_uncond,
                              TV* __restrict__ d_cond, TX* __restrict__ d_x, int64_t d, CfgEulerBackwardFlags f) {
  using A = acc_t<TX>;
  const int64_t b = blockIdx.y, start = static_cast<int64_t>(blockIdx.x) * kStepTile;
  const int64_t n = min(kStepTile, d - start), base = b * d + start;
  const A hb = h[b], wb = w[b];
  const CfgEulerBackwardCoefs<A> c{wb, sub_rn(A(1), wb), f.memoryless ? mul_rn(A(2), hb) : hb, sub_rn(A(1), t[b]),
                                   f.memoryless ? sub_rn(A(1), mul_rn(hb, kappa[b])) : A(1)};
  const bool need_v = f.need_u || f.need_c;
  if constexpr (kVec) {
    constexpr int G = group_size<TV, TX>();
    for (int64_t i = threadIdx.x * G; i < n; i += kThreads * G) {
      A gv[G], gn[G], gh[G], du[G], dc[G], dx[G];
#pragma unroll
      for (int k = 0; k < G; ++k) gv[k] = gn[k] = gh[k] = A(0);
      if (f.has_gv && need_v) load_group<G>(grad_v + base + i, gv);
      if (f.has_gn) load_group<G>(grad_next + base + i, gn);
      if (f.has_gh) load_group<G>(grad_hat + base + i, gh);
#pragma unroll
      for (int k = 0; k < G; ++k) cfg_euler_backward_element(gv[k], gn[k], gh[k], c, f, du[k], dc[k], dx[k]);
      if (f.need_u) store_group<G>(d_uncond + base + i, du);
      if (f.need_c) store_group<G>(d_cond + base + i, dc);
      if (f.need_x) store_group<G>(d_x + base + i, dx);
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const int64_t j = base + i;
      const A gv = f.has_gv && need_v ? static_cast<A>(to_acc(grad_v[j])) : A(0);
      const A gn = f.has_gn ? static_cast<A>(to_acc(grad_next[j])) : A(0);
      const A gh = f.has_gh ? static_cast<A>(to_acc(grad_hat[j])) : A(0);
      A du, dc, dx;
      cfg_euler_backward_element(gv, gn, gh, c, f, du, dc, dx);
      if (f.need_u) d_uncond[j] = from_acc<TV>(du);
      if (f.need_c) d_cond[j] = from_acc<TV>(dc);
      if (f.need_x) d_x[j] = from_acc<TX>(dx);
    }
  }
}

}  // namespace cuda
}  // namespace flowkern
