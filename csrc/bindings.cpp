// flowkern._C: the only translation unit that includes torch/extension.h (slow to compile).
// Each op has one block: validate (device, dtype, shape, contiguity), dispatch CPU/CUDA, release the GIL.
// Python (flowkern/ops/<op>.py) normalises coefficients and unifies dtypes before calling in.
#include <torch/extension.h>

#include "flowkern/checks.h"
#include "flowkern/ops/vggflow_matching_loss.h"
// @@includes (one line per op, keep sorted)

namespace py = pybind11;

#ifdef FLOWKERN_WITH_CUDA
#define FK_DISPATCH(primary, fn, ...) \
  ((primary).is_cuda() ? flowkern::cuda::fn(__VA_ARGS__) : flowkern::cpu::fn(__VA_ARGS__))
#else
#define FK_DISPATCH(primary, fn, ...)                                                                      \
  ([&] {                                                                                                  \
    TORCH_CHECK(!(primary).is_cuda(), "flowkern._C was built without CUDA; rebuild with nvcc available"); \
    return flowkern::cpu::fn(__VA_ARGS__);                                                                \
  }())
#endif

// ---- vggflow_matching_loss (M16) ----
static std::tuple<at::Tensor, at::Tensor> vggflow_matching_loss_fwd(const at::Tensor& v_ft, const at::Tensor& v_base,
                                                                    const at::Tensor& reward_grad,
                                                                    const at::Tensor& value_out, const at::Tensor& t,
                                                                    double beta, int64_t eta_mode, bool compute_grad) {
  FK_CHECK_PRIMARY(v_ft);
  FK_CHECK_LIKE(v_base, v_ft);
  FK_CHECK_LIKE(reward_grad, v_ft);
  FK_CHECK_LIKE(value_out, v_ft);
  FK_CHECK_COEF(t, v_ft);
  TORCH_CHECK(eta_mode >= 0 && eta_mode <= 2, "eta_mode must be 0 (quad), 1 (linear) or 2 (constant)");
  return FK_DISPATCH(v_ft, vggflow_matching_loss, v_ft, v_base, reward_grad, value_out, t, beta, eta_mode,
                     compute_grad);
}

// @@functions (one block per op above this line)

PYBIND11_MODULE(_C, m) {
  m.doc() = "flowkern fused-op kernels (C++ CPU and, when built with CUDA, CUDA)";
#ifdef FLOWKERN_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.def("vggflow_matching_loss_fwd", &vggflow_matching_loss_fwd, py::call_guard<py::gil_scoped_release>());
  // @@defs (one m.def block per op)
}
