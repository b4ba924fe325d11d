// consistency_residual (M17, M18, M20) and consistency_residual_exact (M21) CUDA kernels, torch-free.
// One block per (sample, chunk) tile; 16-byte loads when every pointer is aligned and D_b % N == 0 (forward:
// D_b % group_size<TV, TX>() == 0, the value outputs in TV and the targets in TX), scalar otherwise.
//   forward:  R = (G_t - G)/e_b + rho_w (G_x - G)/eps_x + rho_G (vb_G - vb)/eps_x; partial[tile] = (sum R^2, sum c^2);
//             q = 2R/D in fp32 (fp64 for fp64) for the backward; both losses in the last block (one launch) (8R + 1W)
//   backward: grad_c_t = g q/e_b, grad_c_x = g q rho_w/eps_x, grad_c = -g q (1/e_b + rho_w/eps_x) + g_bnd 2 m_b c/D,
//             c read only where g_bnd m_b != 0                                                             (1R + 3W)
//   exact:    R = dG + T3; partial[tile] = (sum R^2, sum c^2 on terminal samples); dL_cons/ddG = 2R/D   (2R + 1W)
#pragma once
#include "../consistency_probes/kernel.cuh"
#include "flowkern/cuda_common.cuh"

namespace flowkern {
namespace cuda {

// Where the two losses go: the last block to finish (atomic ticket on `counter`, zeroed by the launcher) sums the
// per-tile partials (R^2, c^2) sample by sample in index order: L_cons = sum R^2 / D, L_bnd = sum_b m_b sum c^2 / D.
template <typename A>
struct LossOutputs {
  A* partial;  // [2 * tiles]
  unsigned* counter;
  A* l_cons;
  A* l_bnd;
  Coef<A> mask;
  int64_t batch;
  A inv_numel;
};

template <typename A>
__device__ __forceinline__ void finish_losses(A acc_r, A acc_c, const LossOutputs<A>& out, int64_t chunks) {
  __shared__ bool is_last;
  const int64_t tile = blockIdx.x;
  if (threadIdx.x == 0) {
    out.partial[2 * tile] = acc_r;
    out.partial[2 * tile + 1] = acc_c;
    __threadfence();  // publish the partials before taking the ticket
    is_last = atomicAdd(out.counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  A cons = 0, bnd = 0;
  for (int64_t b = 0; b < out.batch; ++b) {  // fixed order: deterministic whichever block comes last
    A r = 0, c = 0;
    for (int64_t k = threadIdx.x; k < chunks; k += kThreads) {
      r += __ldcg(out.partial + 2 * (b * chunks + k));
      c += __ldcg(out.partial + 2 * (b * chunks + k) + 1);
    }
    r = block_sum(r);
    c = block_sum(c);
    cons += r;
    if (out.mask[b] != A(0)) bnd += out.mask[b] * c;
  }
  if (threadIdx.x == 0) {
    *out.l_cons = cons * out.inv_numel;
    *out.l_bnd = bnd * out.inv_numel;
  }
}

// The eight [B, ...] inputs of the finite-difference residual (M20): the value outputs (velocity units) in TV, the
// targets in TX (TV == TX, or a bf16/fp16 TV with fp32 TX: read without a cast copy).
template <typename TV, typename TX>
struct ConsistencyInputs {
  const TV* c;       // c_phi(x, t)
  const TV* c_t;     // c_phi(x, t + e_b)
  const TV* c_x;     // c_phi(x_w, t)
  const TX* ghat;    // ghat at the same three points (M8)
  const TX* ghat_t;
  const TX* ghat_x;
  const TX* vb;      // v_base(x, t)
  const TX* vb_G;    // v_base(x_G, t)
};

// Per-sample coefficients of R.
template <typename A>
struct ResidualCoefs {
  A coef, coef_t, inv_step, k_w, k_g;

  __device__ __forceinline__ A operator()(A c, A c_t, A c_x, A g, A g_t, A g_x, A vb, A vb_g) const {
    const A big_g = c - coef * g, big_g_t = c_t - coef_t * g_t, big_g_x = c_x - coef * g_x;
    return (big_g_t - big_g) * inv_step + k_w * (big_g_x - big_g) + k_g * (vb_g - vb);
  }
};

template <typename TV, typename TX, bool kVec>
__global__ void __launch_bounds__(kThreads)
    consistency_residual_kernel(ConsistencyInputs<TV, TX> in, Coef<acc_t<TX>> t,
                                Coef<acc_t<TX>> rho_w, Coef<acc_t<TX>> rho_g,
                                acc_t<TX>* __restrict__ q, LossOutputs<acc_t<TX>> losses, int64_t d, int64_t chunks,
                                acc_t<TX> beta, int eta_mode, acc_t<TX> eps_t, acc_t<TX> eps_x, acc_t<TX> q_scale) {
  using A = acc_t<TX>;
  const int64_t tile = blockIdx.x, b = tile / chunks, start = (tile % chunks) * kChunk;
  const int64_t n = min(kChunk, d - start), base = b * d + start;
  const A tb = t[b], step = consistency_detail::signed_step(tb, eps_t);
  const ResidualCoefs<A> residual{beta * eta_of(tb, eta_mode), beta * eta_of(tb + step, eta_mode), A(1) / step,
                                  rho_w[b] / eps_x, rho_g[b] / eps_x};
  A acc_r = 0, acc_c = 0;
  if constexpr (kVec) {
    constexpr int G = group_size<TV, TX>();
    for (int64_t i = threadIdx.x * G; i < n; i += kThreads * G) {  // d % G == 0, so no partial groups
      const int64_t j = base + i;
      A c[G], c_t[G], c_x[G], g[G], g_t[G], g_x[G], vb[G], vb_g[G];
      load_group<G>(in.c + j, c);
      load_group<G>(in.c_t + j, c_t);
      load_group<G>(in.c_x + j, c_x);
      load_group<G>(in.ghat + j, g);
      load_group<G>(in.ghat_t + j, g_t);
      load_group<G>(in.ghat_x + j, g_x);
      load_group<G>(in.vb + j, vb);
      load_group<G>(in.vb_G + j, vb_g);
      alignas(16) A out[G];
#pragma unroll
      for (int k = 0; k < G; ++k) {
        const A r = residual(c[k], c_t[k], c_x[k], g[k], g_t[k], g_x[k], vb[k], vb_g[k]);
        acc_r += r * r;
        acc_c += c[k] * c[k];
        out[k] = r * q_scale;
      }
      if (q != nullptr) consistency_detail::store_acc<G>(q + j, out);
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const int64_t j = base + i;
      const A cc = to_acc(in.c[j]);
      const A r = residual(cc, A(to_acc(in.c_t[j])), A(to_acc(in.c_x[j])), A(to_acc(in.ghat[j])),
                           A(to_acc(in.ghat_t[j])), A(to_acc(in.ghat_x[j])), A(to_acc(in.vb[j])),
                           A(to_acc(in.vb_G[j])));
      acc_r += r * r;
      acc_c += cc * cc;
      if (q != nullptr) q[j] = r * q_scale;
    }
  }
  finish_losses(block_sum(acc_r), block_sum(acc_c), losses, chunks);
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    consistency_residual_backward_kernel(const acc_t<T>* __restrict__ q, const T* __restrict__ c,
                                         Coef<acc_t<T>> t, Coef<acc_t<T>> rho_w,
                                         Coef<acc_t<T>> mask, const acc_t<T>* __restrict__ grad_cons,
                                         const acc_t<T>* __restrict__ grad_bnd, T* __restrict__ grad_c,
                                         T* __restrict__ grad_c_t, T* __restrict__ grad_c_x, int64_t d, int64_t chunks,
                                         acc_t<T> eps_t, acc_t<T> eps_x, acc_t<T> bnd_scale) {
  using A = acc_t<T>;
  const int64_t tile = blockIdx.x, b = tile / chunks, start = (tile % chunks) * kChunk;
  const int64_t n = min(kChunk, d - start), base = b * d + start;
  const A inv_step = A(1) / consistency_detail::signed_step(t[b], eps_t), k_w = rho_w[b] / eps_x;
  const A g = *grad_cons, s_t = g * inv_step, s_x = g * k_w, s_c = -g * (inv_step + k_w);
  const A s_b = *grad_bnd * mask[b] * bnd_scale;
  const bool read_c = grad_c != nullptr && s_b != A(0);  // c is read on terminal samples only (assumed finite)
  if constexpr (kVec) {
    constexpr int N = Pack<T>::N;
    for (int64_t i = threadIdx.x * N; i < n; i += kThreads * N) {
      const int64_t j = base + i;
      alignas(16) A qv[N];
      consistency_detail::load_acc<N>(q + j, qv);
      if (grad_c_t != nullptr) {
        Pack<T> out;
#pragma unroll
        for (int k = 0; k < N; ++k) out.v[k] = from_acc<T>(qv[k] * s_t);
        store_pack(grad_c_t + j, out);
      }
      if (grad_c_x != nullptr) {
        Pack<T> out;
#pragma unroll
        for (int k = 0; k < N; ++k) out.v[k] = from_acc<T>(qv[k] * s_x);
        store_pack(grad_c_x + j, out);
      }
      if (grad_c != nullptr) {
        Pack<T> out;
        if (read_c) {
          const Pack<T> cv = load_pack(c + j);
#pragma unroll
          for (int k = 0; k < N; ++k) out.v[k] = from_acc<T>(qv[k] * s_c + s_b * to_acc(cv.v[k]));
        } else {
#pragma unroll
          for (int k = 0; k < N; ++k) out.v[k] = from_acc<T>(qv[k] * s_c);
        }
        store_pack(grad_c + j, out);
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const int64_t j = base + i;
      const A qj = q[j];
      if (grad_c_t != nullptr) grad_c_t[j] = from_acc<T>(qj * s_t);
      if (grad_c_x != nullptr) grad_c_x[j] = from_acc<T>(qj * s_x);
      if (grad_c != nullptr) grad_c[j] = from_acc<T>(read_c ? qj * s_c + s_b * to_acc(c[j]) : qj * s_c);
    }
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    consistency_residual_exact_kernel(const T* __restrict__ dG, const T* __restrict__ t3, const T* __restrict__ c,
                                      T* __restrict__ grad, LossOutputs<acc_t<T>> losses, int64_t d, int64_t chunks,
                                      acc_t<T> grad_scale) {
  using A = acc_t<T>;
  const int64_t tile = blockIdx.x, b = tile / chunks, start = (tile % chunks) * kChunk;
  const int64_t n = min(kChunk, d - start), base = b * d + start;
  const bool terminal = losses.mask[b] != A(0);  // c is read on terminal samples only (M17)
  A acc_r = 0, acc_c = 0;
  if constexpr (kVec) {
    constexpr int N = Pack<T>::N;
    for (int64_t i = threadIdx.x * N; i < n; i += kThreads * N) {
      const int64_t j = base + i;
      const Pack<T> dg = load_pack(dG + j), t3v = load_pack(t3 + j);
      Pack<T> out;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A r = to_acc(dg.v[k]) + to_acc(t3v.v[k]);
        acc_r += r * r;
        out.v[k] = from_acc<T>(r * grad_scale);
      }
      if (grad != nullptr) store_pack(grad + j, out);
      if (terminal) {
        const Pack<T> cv = load_pack(c + j);
#pragma unroll
        for (int k = 0; k < N; ++k) acc_c += to_acc(cv.v[k]) * to_acc(cv.v[k]);
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const int64_t j = base + i;
      const A r = to_acc(dG[j]) + to_acc(t3[j]);
      acc_r += r * r;
      if (grad != nullptr) grad[j] = from_acc<T>(r * grad_scale);
      if (terminal) acc_c += to_acc(c[j]) * to_acc(c[j]);
    }
  }
  finish_losses(block_sum(acc_r), block_sum(acc_c), losses, chunks);
}

}  // namespace cuda
}  // namespace flowkern
