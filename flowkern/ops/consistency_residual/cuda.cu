// consistency_residual (M17, M18, M20) and consistency_residual_exact (M21) CUDA launchers: device guard, current
// stream, dtype dispatch, launch checks. Each forward is one kernel launch (+ a 4-byte memset): its last block
// finishes both losses from the per-(sample, chunk) partials in a fixed order.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "flowkern/cuda_dispatch.cuh"
#include "kernel.cuh"
#include "../cfg_euler/kernel.h"  // dispatch_velocity_state
#include "kernel.h"

namespace flowkern {
using namespace cuda;
namespace {

at::ScalarType acc_type_of(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Workspace of a forward: the per-tile partials (R^2, c^2) and the last-block counter, zeroed here (one memset).
template <typename A>
LossOutputs<A> loss_outputs(at::Tensor& work, at::Tensor& l_cons, at::Tensor& l_bnd, const CoefArg& mask,
                            int64_t batch, int64_t chunks, double numel, cudaStream_t stream) {
  A* partial = work.mutable_data_ptr<A>();
  unsigned* counter = reinterpret_cast<unsigned*>(partial + 2 * batch * chunks);
  C10_CUDA_CHECK(cudaMemsetAsync(counter, 0, sizeof(unsigned), stream));
  return {partial, counter, l_cons.mutable_data_ptr<A>(), l_bnd.mutable_data_ptr<A>(), mask.get<A>(), batch,
          A(1.0 / numel)};
}

}  // namespace

template <>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_consistency_residual<c10::kCUDA>(
    const args::ConsistencyResidual& a) {
  const at::Tensor& c = a.c;
  const bool compute_grad = a.compute_grad;
  const c10::cuda::CUDAGuard guard(c.device());
  const int64_t batch = c.size(0), d = c.numel() / batch, chunks = (d + kChunk - 1) / kChunk;
  const auto acc_options = c.options().dtype(acc_type_of(a.ghat));  // acc_t<TX>
  at::Tensor q = compute_grad ? at::empty(c.sizes(), acc_options) : at::empty({0}, acc_options);
  at::Tensor work = at::empty({2 * batch * chunks + 1}, acc_options);
  at::Tensor l_cons = at::empty({}, acc_options), l_bnd = at::empty({}, acc_options);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (d > 0) {  // [B, 0]: no launch (an empty grid is an invalid launch)
  // c, c_t, c_x in TV, the targets in TX: op.cpp passes a pair velocity_state_types allows
  dispatch_velocity_state(c.scalar_type(), a.ghat.scalar_type(), "consistency_residual_cuda",
                          [&]<typename TVa, typename TXa>() {
    using TV = cuda_t<TVa>;
    using TX = cuda_t<TXa>;
    using A = acc_t<TX>;
    auto v = [](const at::Tensor& x) { return reinterpret_cast<const TV*>(x.const_data_ptr()); };
    auto x = [](const at::Tensor& y) { return reinterpret_cast<const TX*>(y.const_data_ptr()); };
    const ConsistencyInputs<TV, TX> in{v(c),      v(a.c_t),      v(a.c_x), x(a.ghat),
                                       x(a.ghat_t), x(a.ghat_x), x(a.vb),  x(a.vb_G)};
    A* qp = compute_grad ? q.mutable_data_ptr<A>() : nullptr;
    const bool vec = d % group_size<TV, TX>() == 0 &&
                     all_aligned16({in.c, in.c_t, in.c_x, in.ghat, in.ghat_t, in.ghat_x, in.vb, in.vb_G, qp});
    const A q_scale = A(2.0 / static_cast<double>(c.numel()));
    auto* kernel = vec ? consistency_residual_kernel<TV, TX, true> : consistency_residual_kernel<TV, TX, false>;
    kernel<<<batch * chunks, kThreads, 0, stream>>>(
        in, a.t.get<A>(), a.rho_w.get<A>(), a.rho_G.get<A>(), qp,
        loss_outputs<A>(work, l_cons, l_bnd, a.mask, batch, chunks, static_cast<double>(c.numel()), stream), d, chunks,
        A(a.beta), static_cast<int>(eta_code(a.eta_mode)), A(a.eps_t), A(a.eps_x), q_scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  } else {  // [B, 0]: means over no elements
    l_cons.fill_(NAN);
    l_bnd.fill_(NAN);
  }
  return {l_cons, l_bnd, q};
}

template <>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_consistency_residual_backward<c10::kCUDA>(
    const args::ConsistencyResidualBackward& a) {
  const at::Tensor& c = a.c;
  const bool need_c = a.need_c, need_c_t = a.need_c_t, need_c_x = a.need_c_x;
  const c10::cuda::CUDAGuard guard(c.device());
  const int64_t batch = c.size(0), d = c.numel() / batch, chunks = (d + kChunk - 1) / kChunk;
  auto make = [&](bool need) { return need ? at::empty(c.sizes(), c.options()) : at::empty({0}, c.options()); };
  at::Tensor grad_c = make(need_c), grad_c_t = make(need_c_t), grad_c_x = make(need_c_x);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (d > 0) {  // [B, 0]: no launch (an empty grid is an invalid launch)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "consistency_residual_backward_cuda", [&] {
    using T = cuda_t<scalar_t>;
    using A = acc_t<T>;
    auto out = [](bool need, at::Tensor& x) { return need ? reinterpret_cast<T*>(x.mutable_data_ptr()) : nullptr; };
    T* gc = out(need_c, grad_c);
    T* gct = out(need_c_t, grad_c_t);
    T* gcx = out(need_c_x, grad_c_x);
    const T* cp = reinterpret_cast<const T*>(c.const_data_ptr());
    const A* qp = a.q.const_data_ptr<A>();
    const bool vec = d % Pack<T>::N == 0 && aligned16(qp) && aligned16(cp) && (gc == nullptr || aligned16(gc)) &&
                     (gct == nullptr || aligned16(gct)) && (gcx == nullptr || aligned16(gcx));
    const A bnd_scale = A(2.0 / static_cast<double>(c.numel()));
    auto* kernel =
        vec ? consistency_residual_backward_kernel<T, true> : consistency_residual_backward_kernel<T, false>;
    kernel<<<batch * chunks, kThreads, 0, stream>>>(qp, cp, a.t.get<A>(), a.rho_w.get<A>(), a.mask.get<A>(),
                                                     a.grad_cons.const_data_ptr<A>(), a.grad_bnd.const_data_ptr<A>(),
                                                     gc, gct, gcx, d, chunks, A(a.eps_t), A(a.eps_x), bnd_scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  }
  return {grad_c, grad_c_t, grad_c_x};
}

template <>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_consistency_residual_exact<c10::kCUDA>(
    const args::ConsistencyResidualExact& a) {
  const at::Tensor &dG = a.dG, &t3 = a.t3, &c = a.c;
  const bool compute_grad = a.compute_grad;
  const c10::cuda::CUDAGuard guard(dG.device());
  const int64_t batch = dG.size(0), d = dG.numel() / batch, chunks = (d + kChunk - 1) / kChunk;
  at::Tensor grad = compute_grad ? at::empty(dG.sizes(), dG.options()) : at::empty({0}, dG.options());
  const auto acc_options = dG.options().dtype(acc_type_of(dG));
  at::Tensor work = at::empty({2 * batch * chunks + 1}, acc_options);
  at::Tensor l_cons = at::empty({}, acc_options), l_bnd = at::empty({}, acc_options);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (d > 0) {  // [B, 0]: no launch (an empty grid is an invalid launch)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dG.scalar_type(), "consistency_residual_exact_cuda", [&] {
    using T = cuda_t<scalar_t>;
    using A = acc_t<T>;
    const T* dgp = reinterpret_cast<const T*>(dG.const_data_ptr());
    const T* t3p = reinterpret_cast<const T*>(t3.const_data_ptr());
    const T* cp = reinterpret_cast<const T*>(c.const_data_ptr());
    T* gp = compute_grad ? reinterpret_cast<T*>(grad.mutable_data_ptr()) : nullptr;
    const bool vec = d % Pack<T>::N == 0 && aligned16(dgp) && aligned16(t3p) && aligned16(cp) &&
                     (gp == nullptr || aligned16(gp));
    const A scale = A(2.0 / static_cast<double>(dG.numel()));
    auto* kernel = vec ? consistency_residual_exact_kernel<T, true> : consistency_residual_exact_kernel<T, false>;
    kernel<<<batch * chunks, kThreads, 0, stream>>>(dgp, t3p, cp, gp,
                                                     loss_outputs<A>(work, l_cons, l_bnd, a.mask, batch, chunks,
                                                                     static_cast<double>(dG.numel()), stream),
                                                     d, chunks, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  } else {  // [B, 0]: means over no elements
    l_cons.fill_(NAN);
    l_bnd.fill_(NAN);
  }
  return {l_cons, l_bnd, grad};
}

}  // namespace flowkern
