// Autograd for the flowkern ops, registered in C++ for the Autograd dispatch key so that an eager call never goes
// through Python. One generic boxed kernel (csrc/autograd.cpp) serves every op: it checks that the tensor arguments
// share a device (naming the one that does not), sets the op's compute_grad flag, and, when a differentiable argument
// requires grad, records a FlowkernBackward node. An op describes which arguments and outputs are differentiable, what
// its backward needs saved, and a backward function that calls its backward op through the dispatcher (so
// torch.compile traces it with the fake kernels).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <utility>
#include <vector>

namespace flowkern {

constexpr int kMaxDifferentiableArgs = 4;

// What a backward function sees. Arguments are addressed by their schema position (args::<Op>::Index).
class BackwardContext {
 public:
  BackwardContext(std::vector<c10::IValue>& args, std::vector<at::Tensor>& outputs, bool releasing, uint64_t needs,
                  const std::vector<int64_t>& differentiable,
                  const std::array<at::ScalarType, kMaxDifferentiableArgs>& types)
      : args(args), outputs(outputs), releasing(releasing), needs_(needs), differentiable_(differentiable),
        types_(types) {}

  std::vector<c10::IValue>& args;    // forward arguments: the saved ones (tensors unpacked), None elsewhere
  std::vector<at::Tensor>& outputs;  // forward outputs: the saved ones, undefined elsewhere
  const bool releasing;              // the graph is freed after this backward: saved outputs may be reused in place

  // A gradient is wanted for argument `arg` in this backward.
  bool needs_grad(int64_t arg) const { return (needs_ >> arg) & 1; }
  // The dtype a differentiable argument had in the forward; Undefined where it was None.
  at::ScalarType input_type(int64_t arg) const {
    for (size_t k = 0; k < differentiable_.size(); ++k)
      if (differentiable_[k] == arg) return types_[k];
    return at::ScalarType::Undefined;
  }

 private:
  uint64_t needs_;
  const std::vector<int64_t>& differentiable_;
  const std::array<at::ScalarType, kMaxDifferentiableArgs>& types_;
};

// grads: one per forward output, undefined where it got no cotangent. Returns one gradient per forward argument
// (undefined where none).
using BackwardFn = std::vector<at::Tensor> (*)(BackwardContext& ctx, const std::vector<at::Tensor>& grads);

struct AutogradSpec {
  std::vector<int64_t> differentiable_args;     // argument positions that may receive gradients (at most 4)
  std::vector<int64_t> differentiable_outputs;  // output positions that carry gradients
  std::vector<int64_t> saved_args;
  std::vector<int64_t> saved_outputs;           // never differentiable outputs (no reference cycle)
  BackwardFn backward = nullptr;
  // Loss ops that write d loss / d args[first] into outputs[second] in the forward: the backward scales that saved
  // gradient by the loss cotangent (output 0), in place when the graph is being freed (no extra buffer, and no
  // memory traffic at all when the cotangent is 1). Used when `backward` is null.
  std::vector<std::pair<int64_t, int64_t>> saved_gradients;
  // A bool argument (compute_grad) raised to true when a gradient will be needed: when any of grad_flag_args (by
  // default every differentiable argument) requires grad. The kernels then write a gradient in the forward only when
  // it will be used. -1: none.
  int64_t grad_flag = -1;
  std::vector<int64_t> grad_flag_args;
};

// Registers the autograd kernel of flowkern::<name>; call inside TORCH_LIBRARY_IMPL(flowkern, Autograd, m). An op
// that is not differentiable registers an empty spec (its arguments' devices are still checked).
void register_autograd(torch::Library& m, const char* name, AutogradSpec spec = {});

// Calls flowkern::<name> through the dispatcher (boxed: the arguments in schema order) and returns its outputs. The
// operator is looked up once per call site (the name is a string literal).
torch::jit::Stack call_op(const char* name, torch::jit::Stack args);

// grad_loss * saved (the saved gradient of a loss), reusing `saved` in place when the context may release it.
at::Tensor scale_saved_gradient(at::Tensor saved, const at::Tensor& grad_loss, bool in_place);

}  // namespace flowkern
