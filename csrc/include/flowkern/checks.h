// Argument checks for the op entry points: every failure names the argument and raises TypeError (dtype) or
// ValueError (shape, device, value) in Python, like the public functions' own checks.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <initializer_list>
#include <optional>
#include <string>

#include "flowkern/coef.h"

namespace flowkern {

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// fp64 when `t` is fp64 (so gradcheck runs the real kernels), else fp32: the accumulation and loss type.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A [B, ...] input: floating, on `ref`'s device, of `ref`'s shape (the primary input itself: ref == &x).
inline void check_input(const at::Tensor& x, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(is_float_type(x.scalar_type()), name, " must be float32, bfloat16, float16 or float64, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == ref.device(), name, " is on ", x.device(), " but ", ref_name, " is on ",
                    ref.device());
  TORCH_CHECK_VALUE(x.sizes() == ref.sizes(), name, " has shape ", x.sizes(), " but ", ref_name, " has shape ",
                    ref.sizes());
}

inline void check_primary(const at::Tensor& x, const char* name) {
  TORCH_CHECK_TYPE(is_float_type(x.scalar_type()), name, " must be float32, bfloat16, float16 or float64, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(0) > 0, name, " must have a non-empty batch dimension, got shape ",
                    x.sizes());
}

inline void check_optional_input(const std::optional<at::Tensor>& x, const char* name, const at::Tensor& ref,
                                 const char* ref_name) {
  if (x.has_value()) check_input(*x, name, ref, ref_name);
}

// A per-sample coefficient argument (`Tensor? x, float x_value` in a schema): a [B] or 0-dim tensor, or a float
// (never a filled [B] tensor). check() validates it against the primary input and brings a tensor to the accumulation
// dtype, contiguous (a copy only when the caller's was not); on CPU it checks the values too (finite, > 0 if asked).
// get<A>() is the kernels' view; a coefficient an op does not use is left unchecked and never read.
struct CoefArg {
  const char* name = "";
  at::Tensor tensor;  // undefined: the value is a float
  double value = 0;

  CoefArg() = default;
  CoefArg(const char* name, std::optional<at::Tensor> given, double value)
      : name(name), tensor(given ? std::move(*given) : at::Tensor()), value(value) {}

  void check(const at::Tensor& primary, at::ScalarType acc, bool positive = false);

  template <typename A>
  Coef<A> get() const {
    if (!tensor.defined()) return Coef<A>{nullptr, 0, static_cast<A>(value)};
    return Coef<A>{tensor.const_data_ptr<A>(), tensor.dim() == 0 ? 0 : 1, A(0)};  // const_data_ptr<A> checks the dtype
  }
};

// A finite float hyperparameter, > 0 when `positive`.
inline void check_float(const char* name, double value, bool positive = false) {
  TORCH_CHECK_VALUE(std::isfinite(value) && (!positive || value > 0), name, " must be a", positive ? " positive" : "",
                    " finite float, got ", value);
}

// A string choice: its position in `choices` (a ValueError naming the argument and the choices otherwise).
int64_t choice(const char* name, const std::string& value, std::initializer_list<const char*> choices);

// eta_t of (M15) by name: 0 'quad' (t^2), 1 'linear' (t), 2 'constant' (1); the kernels take the code.
inline int64_t eta_code(const std::string& eta_mode) { return choice("eta_mode", eta_mode, {"quad", "linear", "constant"}); }

}  // namespace flowkern

namespace flowkern {

// One element type for kernels that take a single one: the inputs' shared dtype, else fp32 (fp64 if one is fp64).
inline at::ScalarType common_type(std::initializer_list<const at::Tensor*> xs) {
  const at::ScalarType first = (*xs.begin())->scalar_type();
  bool same = true, any_double = false;
  for (const at::Tensor* x : xs) {
    if (x == nullptr || !x->defined()) continue;
    same &= x->scalar_type() == first;
    any_double |= x->scalar_type() == at::kDouble;
  }
  return same ? first : (any_double ? at::kDouble : at::kFloat);
}

// x in `type` (x itself, without a dispatcher call, when it already is).
inline at::Tensor to_type(const at::Tensor& x, at::ScalarType type) {
  return x.scalar_type() == type ? x : x.to(type);
}

// x as a contiguous tensor of `type` (x itself when it already is one).
inline at::Tensor as_type(const at::Tensor& x, at::ScalarType type) {
  return x.scalar_type() == type ? x.contiguous() : x.to(type).contiguous();
}

}  // namespace flowkern
