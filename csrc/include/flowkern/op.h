// Registering a flowkern op from its argument struct (docs/ops.md). The schema is written once, in the op's Python
// surface; csrc/gen_op_args.py turns it into `args::<Op>` (one field per argument, the schema text, the positions).
// A kernel is `std::tuple<at::Tensor...> kernel(args::<Op>& a)`, registered boxed: the dispatcher's stack is read into
// the struct directly, with no unboxing of the arguments one by one and no schema restated in C++.
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>
#include <utility>

#include "flowkern/autograd.h"
#include "flowkern/checks.h"

namespace flowkern {

template <typename Args, auto kKernel>
void boxed_kernel(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  Args args(stack->data() + stack->size() - Args::kNumArgs);
  auto outputs = kKernel(args);
  torch::jit::drop(*stack, Args::kNumArgs);
  std::apply([stack](auto&... out) { (stack->emplace_back(std::move(out)), ...); }, outputs);
}

// Inside TORCH_LIBRARY_IMPL(flowkern, <key>, m): the kernel of this dispatch key.
template <typename Args, auto kKernel>
void impl(torch::Library& m) {
  m.impl(Args::kName, torch::CppFunction::makeFromBoxedFunction<&boxed_kernel<Args, kKernel>>());
}

}  // namespace flowkern
