// The one autograd kernel of the flowkern ops (see flowkern/autograd.h). Boxed, so it works for every schema
// without restating it: it checks the arguments' devices, sets the op's compute_grad flag, records the graph edges of
// the differentiable arguments, runs the op below autograd, attaches the outputs to a FlowkernBackward node and keeps
// what the op's backward asked for. The only translation unit that includes the autograd headers (slow to compile).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/mul.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <array>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

#include "flowkern/autograd.h"

namespace flowkern {
#ifdef FLOWKERN_WITH_CUDA
namespace cuda {
void scale_saved_gradient_in_place(at::Tensor& x, const at::Tensor& grad_loss);  // csrc/cuda/scale_saved_gradient.cu
}  // namespace cuda
#endif
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// Fake or functional tensors (torch.compile, opcheck): no data to look at and nothing to reuse in place.
bool is_traced(const at::Tensor& x) {
  return x.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
}

// Every tensor argument on one device: the dispatcher would otherwise route a call that mixes them to one device's
// kernel (or, for a meta tensor among CPU ones, to the fake kernel) before any check of the op's own.
void check_devices(const std::vector<c10::Argument>& schema, const c10::IValue* in) {
  const at::Tensor* first = nullptr;
  size_t first_i = 0;
  for (size_t i = 0; i < schema.size(); ++i) {
    if (!in[i].isTensor()) continue;
    const at::Tensor& x = in[i].toTensor();
    TORCH_CHECK_TYPE(x.defined(), schema[i].name(), " must be a Tensor, got None");  // None binds to a Tensor argument
    if (first == nullptr) {
      first = &x;
      first_i = i;
    } else if (x.device() != first->device()) {
      TORCH_CHECK_VALUE(false, schema[i].name(), " is on ", x.device(), " but ", schema[first_i].name(), " is on ",
                        first->device(), "; move both to one device");
    }
  }
}

// Autograd nodes are intrusive_ptr-owned in torch >= 2.12 and shared_ptr-owned before (torch 2.11: the GPU machine's).
template <class T, class... Args>
auto make_node(Args&&... args) {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, T>) {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  } else {
    return std::make_shared<T>(std::forward<Args>(args)...);
  }
}

struct FlowkernBackward final : torch::autograd::Node {
  const AutogradSpec* spec;
  const char* op_name;
  std::vector<c10::IValue> args;                                     // saved non-tensor arguments (n_args, or empty)
  c10::SmallVector<std::pair<int64_t, SavedVariable>, 4> tensor_args;  // saved tensor arguments (version-checked)
  std::vector<at::Tensor> outputs;                                   // saved outputs (n_outputs, or empty)
  std::array<at::ScalarType, kMaxDifferentiableArgs> types{};        // per differentiable argument (Undefined: None)
  size_t n_outputs;
  bool releasing = false;

  FlowkernBackward(const AutogradSpec* spec, const char* op_name, size_t n_outputs)
      : spec(spec), op_name(op_name), n_outputs(n_outputs) {
    types.fill(at::ScalarType::Undefined);
  }

  std::string name() const override { return op_name; }
  void will_release_variables() override { releasing = true; }
  void release_variables() override {
    args.clear();
    tensor_args.clear();
    outputs.clear();
  }

  variable_list apply(variable_list&& grads) override {
    const auto& diff = spec->differentiable_args;
    variable_list result(diff.size());
    if (spec->backward == nullptr) {  // a loss with saved gradients: grad_loss * saved, in place when released
      const at::Tensor& grad_loss = grads[0];
      if (!grad_loss.defined()) return result;
      for (const auto& [arg, output] : spec->saved_gradients) {
        for (size_t k = 0; k < diff.size(); ++k) {
          at::Tensor& saved = outputs[output];
          if (diff[k] == arg && task_should_compute_output(k) && saved.defined() && saved.sym_numel() != 0) {
            result[k] = scale_saved_gradient(releasing ? std::move(saved) : saved, grad_loss, releasing);
          }
        }
      }
      return result;
    }
    for (auto& [i, saved] : tensor_args) args[i] = saved.unpack();
    uint64_t needs = 0;
    for (size_t k = 0; k < diff.size(); ++k) needs |= uint64_t(task_should_compute_output(k)) << diff[k];
    BackwardContext ctx(args, outputs, releasing, needs, diff, types);
    // grads arrive in the order the differentiable outputs were attached; hand them over by output position
    std::vector<at::Tensor> by_output(n_outputs);
    for (size_t k = 0; k < spec->differentiable_outputs.size(); ++k) by_output[spec->differentiable_outputs[k]] = grads[k];
    std::vector<at::Tensor> per_arg = spec->backward(ctx, by_output);
    for (size_t k = 0; k < diff.size(); ++k) {
      if (ctx.needs_grad(diff[k])) result[k] = std::move(per_arg[diff[k]]);
    }
    return result;
  }
};

struct AutogradKernel final : c10::OperatorKernel {
  std::string node_name;
  AutogradSpec spec;

  AutogradKernel(const std::string& name, AutogradSpec s) : node_name("flowkern::" + name + "Backward"), spec(std::move(s)) {
    TORCH_CHECK(spec.differentiable_args.size() <= kMaxDifferentiableArgs, name, ": too many differentiable args");
  }

  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
    const auto& schema = op.schema().arguments();
    const size_t n_args = schema.size(), n_outputs = op.schema().returns().size();
    c10::IValue* in = stack->data() + stack->size() - n_args;
    check_devices(schema, in);
    const auto requires_grad = [&](const std::vector<int64_t>& args) {
      bool any = false;
      for (int64_t i : args) any |= in[i].isTensor() && in[i].toTensor().requires_grad();
      return any && at::GradMode::is_enabled();
    };
    const bool any_requires_grad = requires_grad(spec.differentiable_args);
    // Only ever raised: a graph traced with the flag set (torch.compile) runs its forward without grad mode and must
    // still write the gradient its backward reads.
    if (spec.grad_flag >= 0 && !in[spec.grad_flag].toBool()) {
      in[spec.grad_flag] = spec.grad_flag_args.empty() ? any_requires_grad : requires_grad(spec.grad_flag_args);
    }
    if (!any_requires_grad) {
      op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
      return;
    }
    auto node = make_node<FlowkernBackward>(&spec, node_name.c_str(), n_outputs);
    std::array<at::Tensor, kMaxDifferentiableArgs> diff_args;
    for (size_t k = 0; k < spec.differentiable_args.size(); ++k) {
      const c10::IValue& v = in[spec.differentiable_args[k]];
      if (v.isTensor()) {
        diff_args[k] = v.toTensor();
        node->types[k] = diff_args[k].scalar_type();
      }
    }
    node->set_next_edges(torch::autograd::collect_next_edges(
        at::ArrayRef<at::Tensor>(diff_args.data(), spec.differentiable_args.size())));
    if (!spec.saved_args.empty()) node->args.resize(n_args);
    for (int64_t i : spec.saved_args) {
      if (in[i].isTensor()) {
        node->tensor_args.emplace_back(i, SavedVariable(in[i].toTensor(), /*is_output=*/false));
      } else {
        node->args[i] = in[i];
      }
    }
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
    }
    c10::IValue* out = stack->data() + stack->size() - n_outputs;
    for (int64_t o : spec.differentiable_outputs) torch::autograd::set_history(out[o].toTensor(), node);
    if (!spec.saved_outputs.empty()) node->outputs.resize(n_outputs);
    for (int64_t o : spec.saved_outputs) node->outputs[o] = out[o].toTensor();
  }
};

}  // namespace

at::Tensor scale_saved_gradient(at::Tensor saved, const at::Tensor& grad_loss, bool in_place) {
  if (!in_place || is_traced(saved) || is_traced(grad_loss)) return at::mul(saved, grad_loss);
  if (grad_loss.is_cpu() && grad_loss.numel() == 1) {
    // loss.backward(): the saved gradient is the answer, nothing is read or written
    const double g = grad_loss.scalar_type() == at::kFloat    ? *grad_loss.const_data_ptr<float>()
                     : grad_loss.scalar_type() == at::kDouble ? *grad_loss.const_data_ptr<double>()
                                                              : grad_loss.item<double>();
    if (g == 1.0) return saved;
  }
#ifdef FLOWKERN_WITH_CUDA
  if (saved.is_cuda() && grad_loss.is_cuda() && saved.is_contiguous()) {
    cuda::scale_saved_gradient_in_place(saved, grad_loss);  // skipped on the device when the cotangent is 1
    return saved;
  }
#endif
  return saved.mul_(grad_loss);
}

void register_autograd(torch::Library& m, const char* name, AutogradSpec spec) {
  m.impl(name, torch::CppFunction::makeFromBoxedFunctor(std::make_unique<AutogradKernel>(name, std::move(spec))));
}

}  // namespace flowkern
