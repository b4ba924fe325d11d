// Autograd for the flowkern ops, registered in C++ for the Autograd dispatch key so that an eager call never goes
// through Python. One generic boxed kernel (csrc/autograd.cpp) serves every op; an op describes which arguments and
// outputs are differentiable, what its backward needs saved, and a backward function that calls its backward op
// through the dispatcher (so torch.compile traces it with the fake kernels).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <torch/library.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace flowkern {

// What a backward function sees.
struct BackwardContext {
  std::vector<c10::IValue> args;      // forward arguments; those not saved are None
  std::vector<at::Tensor> outputs;    // forward outputs; those not saved are undefined
  std::vector<bool> needs_grad;       // per forward argument: a gradient is wanted in this backward
  std::vector<bool> was_tensor;       // per forward argument: it was a (defined) tensor, not None
  std::vector<at::ScalarType> types;  // per forward argument: its dtype if it was a tensor (else Undefined)
  bool releasing = false;             // the graph is freed after this backward: saved outputs may be reused in place
};

// grads: one per forward output, undefined where it got no cotangent. Returns one gradient per forward argument
// (undefined where none).
using BackwardFn = std::vector<at::Tensor> (*)(BackwardContext& ctx, const std::vector<at::Tensor>& grads);

struct AutogradSpec {
  std::vector<int64_t> differentiable_args;     // argument positions that may receive gradients
  std::vector<int64_t> differentiable_outputs;  // output positions that carry gradients
  std::vector<int64_t> saved_args;
  std::vector<int64_t> saved_outputs;           // never differentiable outputs (no reference cycle)
  BackwardFn backward = nullptr;
  // Loss ops that write d loss / d args[first] into outputs[second] in the forward: the backward scales that saved
  // gradient by the loss cotangent (output 0), in place when the graph is being freed (no extra buffer, and no
  // memory traffic at all when the cotangent is 1). Used when `backward` is null.
  std::vector<std::pair<int64_t, int64_t>> saved_gradients;
};

// Registers the autograd kernel of flowkern::<name>; call inside TORCH_LIBRARY_IMPL(flowkern, Autograd, m).
void register_autograd(torch::Library& m, const char* name, AutogradSpec spec);

// Calls flowkern::<name> through the dispatcher (boxed: the arguments in schema order) and returns its outputs.
torch::jit::Stack call_op(const char* name, torch::jit::Stack args);

// grad_loss * saved (the saved gradient of a loss), reusing `saved` in place when the context may release it.
at::Tensor scale_saved_gradient(at::Tensor saved, const at::Tensor& grad_loss, bool in_place);

}  // namespace flowkern
