// The one autograd kernel of the flowkern ops (see flowkern/autograd.h). Boxed, so it works for every schema
// without restating it: it records the graph edges of the differentiable arguments, runs the op below autograd,
// attaches the outputs to a FlowkernBackward node and keeps what the op's backward asked for. The only translation
// unit that includes the autograd headers (slow to compile).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/mul.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <memory>
#include <string>

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

std::vector<at::Tensor> saved_gradient_backward(const AutogradSpec& spec, BackwardContext& ctx,
                                                const std::vector<at::Tensor>& grads) {
  std::vector<at::Tensor> out(ctx.args.size());
  const at::Tensor& grad_loss = grads[0];
  if (!grad_loss.defined()) return out;
  for (const auto& [arg, output] : spec.saved_gradients) {
    at::Tensor& saved = ctx.outputs[output];
    if (ctx.needs_grad[arg] && saved.defined() && saved.sym_numel() != 0) {  // sym: traced shapes too
      out[arg] = scale_saved_gradient(std::move(saved), grad_loss, ctx.releasing);
    }
  }
  return out;
}

struct FlowkernBackward final : torch::autograd::Node {
  std::string op_name;
  std::shared_ptr<const AutogradSpec> spec;
  std::vector<c10::IValue> args;                              // saved non-tensor arguments
  std::vector<std::pair<int64_t, SavedVariable>> tensor_args;  // saved tensor arguments (version-checked)
  std::vector<at::Tensor> outputs;
  std::vector<bool> was_tensor;
  std::vector<at::ScalarType> types;
  bool releasing = false;

  std::string name() const override { return op_name; }
  void will_release_variables() override { releasing = true; }
  void release_variables() override {
    args.clear();
    tensor_args.clear();
    outputs.clear();
  }

  variable_list apply(variable_list&& grads) override {
    const auto& diff_args = spec->differentiable_args;
    BackwardContext ctx;
    ctx.args = args;
    for (const auto& [i, saved] : tensor_args) ctx.args[i] = saved.unpack();
    ctx.outputs = releasing ? std::move(outputs) : outputs;
    ctx.releasing = releasing;
    ctx.was_tensor = was_tensor;
    ctx.types = types;
    ctx.needs_grad.assign(ctx.args.size(), false);
    for (size_t k = 0; k < diff_args.size(); ++k) ctx.needs_grad[diff_args[k]] = task_should_compute_output(k);
    // grads arrive in the order the differentiable outputs were attached; hand them over by output position
    std::vector<at::Tensor> by_output(ctx.outputs.size());
    for (size_t k = 0; k < spec->differentiable_outputs.size(); ++k) by_output[spec->differentiable_outputs[k]] = grads[k];
    std::vector<at::Tensor> per_arg =
        spec->backward ? spec->backward(ctx, by_output) : saved_gradient_backward(*spec, ctx, by_output);
    variable_list result(diff_args.size());
    for (size_t k = 0; k < diff_args.size(); ++k) {
      if (ctx.needs_grad[diff_args[k]]) result[k] = std::move(per_arg[diff_args[k]]);
    }
    return result;
  }
};

struct AutogradKernel final : c10::OperatorKernel {
  std::string name;
  std::shared_ptr<const AutogradSpec> spec;

  AutogradKernel(std::string n, AutogradSpec s)
      : name("flowkern::" + n + "Backward"), spec(std::make_shared<const AutogradSpec>(std::move(s))) {}

  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
    const size_t n_args = op.schema().arguments().size(), n_outputs = op.schema().returns().size();
    const size_t first_arg = stack->size() - n_args;
    bool any_requires_grad = false;
    if (at::GradMode::is_enabled()) {
      for (int64_t i : spec->differentiable_args) {
        const c10::IValue& v = (*stack)[first_arg + i];
        any_requires_grad |= v.isTensor() && v.toTensor().requires_grad();
      }
    }
    if (!any_requires_grad) {
      op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
      return;
    }
    auto node = c10::make_intrusive<FlowkernBackward>();
    node->op_name = name;
    node->spec = spec;
    std::vector<at::Tensor> diff_args;
    for (int64_t i : spec->differentiable_args) {
      const c10::IValue& v = (*stack)[first_arg + i];
      diff_args.push_back(v.isTensor() ? v.toTensor() : at::Tensor());
    }
    node->set_next_edges(torch::autograd::collect_next_edges(diff_args));
    node->args.resize(n_args);
    node->was_tensor.resize(n_args);
    node->types.resize(n_args, at::ScalarType::Undefined);
    for (size_t i = 0; i < n_args; ++i) {
      const c10::IValue& v = (*stack)[first_arg + i];
      node->was_tensor[i] = v.isTensor();
      if (v.isTensor()) node->types[i] = v.toTensor().scalar_type();
    }
    for (int64_t i : spec->saved_args) {
      const c10::IValue& v = (*stack)[first_arg + i];
      if (v.isTensor()) {
        node->tensor_args.emplace_back(i, SavedVariable(v.toTensor(), /*is_output=*/false));
      } else {
        node->args[i] = v;
      }
    }
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
    }
    const size_t first_output = stack->size() - n_outputs;
    for (int64_t o : spec->differentiable_outputs) {
      torch::autograd::set_history((*stack)[first_output + o].toTensor(), node);
    }
    node->outputs.resize(n_outputs);
    for (int64_t o : spec->saved_outputs) node->outputs[o] = (*stack)[first_output + o].toTensor();
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
