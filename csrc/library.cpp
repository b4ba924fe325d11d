// flowkern._C: the flowkern op library. Each op declares its schema and registers its CPU, CUDA and Autograd kernels
// from its own folder (flowkern/ops/<op>/op.cpp); this file holds the library itself, shared helpers, and the empty
// Python module whose import loads the registrations.
#include <Python.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>

#include "flowkern/autograd.h"
#include "flowkern/checks.h"

namespace flowkern {
namespace {

void check_value(const char* name, double v, bool positive) {
  TORCH_CHECK_VALUE(std::isfinite(v), name, " must be finite, got ", v);
  TORCH_CHECK_VALUE(!positive || v > 0, name, " must be > 0 for every sample, got ", v);
}

}  // namespace

void CoefArg::check(const at::Tensor& primary, at::ScalarType acc, bool positive) {
  if (!tensor.defined()) {
    TORCH_CHECK_VALUE(std::isfinite(value), name, " must be finite, got ", value);
    TORCH_CHECK_VALUE(!positive || value > 0, name, " must be > 0, got ", value);
    return;
  }
  const at::Tensor& c = tensor;
  TORCH_CHECK_TYPE(c.is_floating_point() || c.scalar_type() == at::kInt || c.scalar_type() == at::kLong ||
                       c.scalar_type() == at::kBool,
                   name, " must be a floating tensor, got ", c.scalar_type());
  TORCH_CHECK_VALUE(c.device() == primary.device(), name, " is on ", c.device(), " but the inputs are on ",
                    primary.device());
  TORCH_CHECK_VALUE(c.dim() == 0 || (c.dim() == 1 && c.size(0) == primary.size(0)), name,
                    " must be a scalar or have shape [B]=[", primary.size(0), "], got shape ", c.sizes());
  if (c.scalar_type() != acc || !c.is_contiguous()) tensor = c.to(acc).contiguous();
  if (tensor.is_cpu()) {  // data-dependent check: CPU only (no GPU sync)
    const int64_t n = tensor.numel();
    if (acc == at::kDouble) {
      const double* p = tensor.const_data_ptr<double>();
      for (int64_t i = 0; i < n; ++i) check_value(name, p[i], positive);
    } else {
      const float* p = tensor.const_data_ptr<float>();
      for (int64_t i = 0; i < n; ++i) check_value(name, p[i], positive);
    }
  }
}

int64_t choice(const char* name, const std::string& value, std::initializer_list<const char*> choices) {
  int64_t i = 0;
  for (const char* c : choices) {
    if (value == c) return i;
    ++i;
  }
  std::string listed;
  for (const char* c : choices) listed += std::string(listed.empty() ? "'" : ", '") + c + "'";
  TORCH_CHECK_VALUE(false, name, " must be one of ", listed, ", got '", value, "'");
}

torch::jit::Stack call_op(const char* name, torch::jit::Stack args) {
  static std::mutex mutex;
  static std::unordered_map<const char*, c10::OperatorHandle> ops;  // by the literal's address
  std::optional<c10::OperatorHandle> op;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    auto it = ops.find(name);
    if (it == ops.end()) {
      it = ops.emplace(name, c10::Dispatcher::singleton().findSchemaOrThrow(
                                 (std::string("flowkern::") + name).c_str(), ""))
               .first;
    }
    op = it->second;
  }
  op->callBoxed(&args);
  return args;
}

}  // namespace flowkern

TORCH_LIBRARY(flowkern, m) {}

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "flowkern op library (loads the flowkern:: ops)", -1,
                               nullptr};
  PyObject* mod = PyModule_Create(&module);
#ifdef FLOWKERN_WITH_CUDA
  PyModule_AddIntConstant(mod, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(mod, "WITH_CUDA", 0);
#endif
  return mod;
}
