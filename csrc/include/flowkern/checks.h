// Argument checks for the bindings: every failure names the argument (TORCH_CHECK -> Python exception).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define FK_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define FK_CHECK_SAME_DEVICE(x, ref) \
  TORCH_CHECK((x).device() == (ref).device(), #x " is on ", (x).device(), " but " #ref " is on ", (ref).device())
#define FK_CHECK_SAME_SHAPE(x, ref) \
  TORCH_CHECK((x).sizes() == (ref).sizes(), #x " has shape ", (x).sizes(), " but " #ref " has shape ", (ref).sizes())
#define FK_CHECK_SAME_DTYPE(x, ref) \
  TORCH_CHECK((x).scalar_type() == (ref).scalar_type(), #x " has dtype ", (x).scalar_type(), " but " #ref " has ", (ref).scalar_type())
#define FK_CHECK_FLOATING(x)                                                                   \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kBFloat16 ||        \
                  (x).scalar_type() == at::kHalf || (x).scalar_type() == at::kDouble,         \
              #x " must be float32, bfloat16, float16 or float64, got ", (x).scalar_type())
// Primary [B, ...] input: floating, contiguous, non-empty batch.
#define FK_CHECK_PRIMARY(x)  \
  FK_CHECK_FLOATING(x);      \
  FK_CHECK_CONTIGUOUS(x);    \
  TORCH_CHECK((x).dim() >= 1 && (x).size(0) > 0, #x " must have a non-empty batch dimension")
// Another [B, ...] input like the primary one.
#define FK_CHECK_LIKE(x, ref) \
  FK_CHECK_CONTIGUOUS(x);     \
  FK_CHECK_SAME_DEVICE(x, ref); \
  FK_CHECK_SAME_SHAPE(x, ref);  \
  FK_CHECK_SAME_DTYPE(x, ref)
// Per-sample coefficient: contiguous fp32 (fp64 with fp64 inputs) [B] on the primary's device.
#define FK_CHECK_COEF(c, ref)                                                                        \
  FK_CHECK_CONTIGUOUS(c);                                                                            \
  FK_CHECK_SAME_DEVICE(c, ref);                                                                      \
  TORCH_CHECK((c).dim() == 1 && (c).size(0) == (ref).size(0), #c " must have shape [B]=[", (ref).size(0), "]"); \
  TORCH_CHECK((c).scalar_type() == ((ref).scalar_type() == at::kDouble ? at::kDouble : at::kFloat),     \
              #c " must be float32 (float64 for float64 inputs), got ", (c).scalar_type())
