// consistency_residual (M17, M18, M20) and consistency_residual_exact (M21) CUDA launchers: device guard, current
// stream, dtype dispatch, launch checks. Losses from the per-(sample, chunk) partials, reduced in a fixed order.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "consistency_residual_kernel.cuh"
#include "flowkern/cuda_dispatch.cuh"
#include "flowkern/ops/consistency_residual.h"

namespace flowkern {
namespace cuda {
namespace {

at::ScalarType acc_type_of(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// (L_cons, L_bnd) from partial [B*chunks*2] = (sum R^2, sum c^2) per tile: mean(R^2), (1/B) sum_b m_b sum c^2 / D_b.
std::tuple<at::Tensor, at::Tensor> finish(const at::Tensor& partial, const at::Tensor& mask, int64_t batch,
                                          int64_t chunks, double numel) {
  const at::Tensor tiles = partial.view({batch, chunks, 2});
  at::Tensor l_cons = tiles.select(2, 0).sum().div_(numel);
  at::Tensor l_bnd = tiles.select(2, 1).sum(1).mul_(mask).sum().div_(numel);
  return {l_cons, l_bnd};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_residual(
    const at::Tensor& c, const at::Tensor& c_t, const at::Tensor& c_x, const at::Tensor& ghat, const at::Tensor& ghat_t,
    const at::Tensor& ghat_x, const at::Tensor& vb, const at::Tensor& vb_G, const at::Tensor& t, double beta,
    int64_t eta_mode, double eps_t, double eps_x, const at::Tensor& rho_w, const at::Tensor& rho_G,
    const at::Tensor& mask, bool compute_grad) {
  const c10::cuda::CUDAGuard guard(c.device());
  const int64_t batch = c.size(0), d = c.numel() / batch, chunks = (d + kChunk - 1) / kChunk;
  const auto acc_options = c.options().dtype(acc_type_of(c));
  at::Tensor q = compute_grad ? at::empty(c.sizes(), acc_options) : at::empty({0}, acc_options);
  at::Tensor partial = at::empty({2 * batch * chunks}, acc_options);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "consistency_residual_cuda", [&] {
    using T = cuda_t<scalar_t>;
    using A = acc_t<T>;
    auto ptr = [](const at::Tensor& x) { return reinterpret_cast<const T*>(x.const_data_ptr()); };
    const ConsistencyInputs<T> in{ptr(c), ptr(c_t), ptr(c_x), ptr(ghat), ptr(ghat_t), ptr(ghat_x), ptr(vb), ptr(vb_G)};
    A* qp = compute_grad ? q.mutable_data_ptr<A>() : nullptr;
    const bool vec = d % Pack<T>::N == 0 && aligned16(in.c) && aligned16(in.c_t) && aligned16(in.c_x) &&
                     aligned16(in.ghat) && aligned16(in.ghat_t) && aligned16(in.ghat_x) && aligned16(in.vb) &&
                     aligned16(in.vb_G) && (qp == nullptr || aligned16(qp));
    const A q_scale = A(2.0 / static_cast<double>(c.numel()));
    auto* kernel = vec ? consistency_residual_kernel<T, true> : consistency_residual_kernel<T, false>;
    kernel<<<batch * chunks, kThreads, 0, stream>>>(in, t.const_data_ptr<A>(), rho_w.const_data_ptr<A>(),
                                                     rho_G.const_data_ptr<A>(), qp, partial.mutable_data_ptr<A>(), d,
                                                     chunks, A(beta), static_cast<int>(eta_mode), A(eps_t), A(eps_x),
                                                     q_scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto [l_cons, l_bnd] = finish(partial, mask, batch, chunks, static_cast<double>(c.numel()));
  return {l_cons, l_bnd, q};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_residual_backward(
    const at::Tensor& grad_cons, const at::Tensor& grad_bnd, const at::Tensor& q, const at::Tensor& c,
    const at::Tensor& t, const at::Tensor& rho_w, const at::Tensor& mask, double eps_t, double eps_x, bool need_c,
    bool need_c_t, bool need_c_x) {
  const c10::cuda::CUDAGuard guard(c.device());
  const int64_t batch = c.size(0), d = c.numel() / batch, chunks = (d + kChunk - 1) / kChunk;
  auto make = [&](bool need) { return need ? at::empty(c.sizes(), c.options()) : at::empty({0}, c.options()); };
  at::Tensor grad_c = make(need_c), grad_c_t = make(need_c_t), grad_c_x = make(need_c_x);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "consistency_residual_backward_cuda", [&] {
    using T = cuda_t<scalar_t>;
    using A = acc_t<T>;
    auto out = [](bool need, at::Tensor& x) { return need ? reinterpret_cast<T*>(x.mutable_data_ptr()) : nullptr; };
    T* gc = out(need_c, grad_c);
    T* gct = out(need_c_t, grad_c_t);
    T* gcx = out(need_c_x, grad_c_x);
    const T* cp = reinterpret_cast<const T*>(c.const_data_ptr());
    const A* qp = q.const_data_ptr<A>();
    const bool vec = d % Pack<T>::N == 0 && aligned16(qp) && aligned16(cp) && (gc == nullptr || aligned16(gc)) &&
                     (gct == nullptr || aligned16(gct)) && (gcx == nullptr || aligned16(gcx));
    const A bnd_scale = A(2.0 / static_cast<double>(c.numel()));
    auto* kernel =
        vec ? consistency_residual_backward_kernel<T, true> : consistency_residual_backward_kernel<T, false>;
    kernel<<<batch * chunks, kThreads, 0, stream>>>(qp, cp, t.const_data_ptr<A>(), rho_w.const_data_ptr<A>(),
                                                     mask.const_data_ptr<A>(), grad_cons.const_data_ptr<A>(),
                                                     grad_bnd.const_data_ptr<A>(), gc, gct, gcx, d, chunks, A(eps_t),
                                                     A(eps_x), bnd_scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_c, grad_c_t, grad_c_x};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_residual_exact(const at::Tensor& dG, const at::Tensor& t3,
                                                                          const at::Tensor& c, const at::Tensor& mask,
                                                                          bool compute_grad) {
  const c10::cuda::CUDAGuard guard(dG.device());
  const int64_t batch = dG.size(0), d = dG.numel() / batch, chunks = (d + kChunk - 1) / kChunk;
  at::Tensor grad = compute_grad ? at::empty(dG.sizes(), dG.options()) : at::empty({0}, dG.options());
  at::Tensor partial = at::empty({2 * batch * chunks}, dG.options().dtype(acc_type_of(dG)));
  auto stream = c10::cuda::getCurrentCUDAStream();
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
    kernel<<<batch * chunks, kThreads, 0, stream>>>(dgp, t3p, cp, mask.const_data_ptr<A>(), gp,
                                                     partial.mutable_data_ptr<A>(), d, chunks, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto [l_cons, l_bnd] = finish(partial, mask, batch, chunks, static_cast<double>(dG.numel()));
  return {l_cons, l_bnd, grad};
}

}  // namespace cuda
}  // namespace flowkern
