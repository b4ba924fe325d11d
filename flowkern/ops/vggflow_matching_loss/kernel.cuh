// vggflow_matching_loss (M16) CUDA kernel, torch-free. One block per (sample, chunk) tile:
// diff = v_ft - v_base - beta*eta_t*ghat + c_phi; partial[tile] = sum diff^2; grad = 2*diff/D; the last block to
// finish sums the partials in index order into the loss (one launch). One pass over memory (4R + 1W), 16-byte loads
// and stores when every pointer is aligned, scalar otherwise.
#pragma once
#include "flowkern/coef.h"
#include "flowkern/cuda_common.cuh"

namespace flowkern {
namespace cuda {

// v_ft and the gradient have type TV, v_base, ghat, c_phi type TX (TV == TX, or a bf16/fp16 TV with fp32 TX: the
// methods' bf16 velocity next to fp32 targets, read without a cast copy); arithmetic in A = acc_t<TX>.
template <typename TV, typename TX, bool kVec>
__global__ void __launch_bounds__(kThreads)
    vggflow_matching_loss_kernel(const TV* __restrict__ v_ft, const TX* __restrict__ v_base,
                                 const TX* __restrict__ ghat, const TX* __restrict__ value_out,
                                 Coef<acc_t<TX>> t, TV* __restrict__ grad, acc_t<TX>* __restrict__ partial,
                                 unsigned* __restrict__ counter, acc_t<TX>* __restrict__ loss, int64_t d,
                                 int64_t chunks, acc_t<TX> beta, int eta_mode, acc_t<TX> grad_scale,
                                 acc_t<TX> loss_scale) {
  using A = acc_t<TX>;
  const int64_t tile = blockIdx.x, b = tile / chunks, start = (tile % chunks) * kChunk;
  const int64_t n = min(kChunk, d - start), base = b * d + start;
  const A coef = beta * eta_of(t[b], eta_mode);
  A acc = 0;
  if constexpr (kVec) {
    constexpr int G = group_size<TV, TX>();
    for (int64_t i = threadIdx.x * G; i < n; i += kThreads * G) {  // d % G == 0, so no partial groups
      A vf[G], vb[G], g[G], c[G], out[G];
      load_group<G>(v_ft + base + i, vf);
      load_group<G>(v_base + base + i, vb);
      load_group<G>(ghat + base + i, g);
      load_group<G>(value_out + base + i, c);
#pragma unroll
      for (int k = 0; k < G; ++k) {
        const A x = vf[k] - vb[k] - coef * g[k] + c[k];
        acc += x * x;
        out[k] = x * grad_scale;
      }
      if (grad != nullptr) store_group<G>(grad + base + i, out);
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const int64_t j = base + i;
      const A x = A(to_acc(v_ft[j])) - to_acc(v_base[j]) - coef * to_acc(ghat[j]) + to_acc(value_out[j]);
      acc += x * x;
      if (grad != nullptr) grad[j] = from_acc<TV>(x * grad_scale);
    }
  }
  A total;
  if (last_block_sum(block_sum(acc), partial, counter, &total) && threadIdx.x == 0) *loss = total * loss_scale;
}

}  // namespace cuda
}  // namespace flowkern
