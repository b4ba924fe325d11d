// Instantiates every torch-free CUDA kernel header so a CPU-only machine can compile-check them:
//   nvcc -c -std=c++20 -gencode arch=compute_90a,code=sm_90a -I csrc/include csrc/compile_check/kernels.cu
// (scripts/cuda_compile_check.sh also counts the 128-bit stores in its SASS).
// Each op adds its kernel instantiations below (all element types, vector and scalar paths).
#include "../../flowkern/ops/vggflow_matching_loss/kernel.cuh"

namespace flowkern {
namespace cuda {
#define FK_INSTANTIATE_MATCHING(TV, TX, V)                                                                            \
  template __global__ void vggflow_matching_loss_kernel<TV, TX, V>(const TV*, const TX*, const TX*, const TX*,         \
                                                                   Coef<acc_t<TX>>, TV*, acc_t<TX>*, unsigned*,        \
                                                                   acc_t<TX>*, int64_t, int64_t, acc_t<TX>, int,       \
                                                                   acc_t<TX>, acc_t<TX>);
#define FK_INSTANTIATE_MATCHING_PATHS(TV, TX) \
  FK_INSTANTIATE_MATCHING(TV, TX, true)       \
  FK_INSTANTIATE_MATCHING(TV, TX, false)
FK_INSTANTIATE_MATCHING_PATHS(float, float)
FK_INSTANTIATE_MATCHING_PATHS(double, double)
FK_INSTANTIATE_MATCHING_PATHS(__nv_bfloat16, __nv_bfloat16)
FK_INSTANTIATE_MATCHING_PATHS(__half, __half)
FK_INSTANTIATE_MATCHING_PATHS(__nv_bfloat16, float)
FK_INSTANTIATE_MATCHING_PATHS(__half, float)
}  // namespace cuda
}  // namespace flowkern

// ---- reward_grad_clip (M8) ----
#include "../../flowkern/ops/reward_grad_clip/kernel.cuh"

namespace flowkern {
namespace cuda {
#define FK_INSTANTIATE_CLIP(T, V)                                                                                    \
  template __global__ void reward_grad_sumsq_kernel<T, V>(const T*, double*, unsigned*, double*, acc_t<T>*, int64_t,   \
                                                          int64_t, int64_t);                                            \
  template __global__ void reward_grad_scale_kernel<T, V>(const T*, const acc_t<T>*, T*, int64_t, int64_t, acc_t<T>); \
  template __global__ void reward_grad_clip_fused_kernel<T, V>(const T*, T*, acc_t<T>*, int64_t, acc_t<T>);
FK_INSTANTIATE_CLIP(float, true)
FK_INSTANTIATE_CLIP(float, false)
FK_INSTANTIATE_CLIP(double, true)
FK_INSTANTIATE_CLIP(double, false)
FK_INSTANTIATE_CLIP(__nv_bfloat16, true)
FK_INSTANTIATE_CLIP(__nv_bfloat16, false)
FK_INSTANTIATE_CLIP(__half, true)
FK_INSTANTIATE_CLIP(__half, false)
}  // namespace cuda
}  // namespace flowkern

// ---- adjoint_matching_loss (M26, M28, M32) ----
#include "../../flowkern/ops/adjoint_matching_loss/kernel.cuh"

namespace flowkern {
namespace cuda {
#define FK_INSTANTIATE_ADJOINT_MATCHING(T, V)                                                                         \
  template __global__ void adjoint_matching_reduce_kernel<T, V, kAmNorm>(                                              \
      const T*, const T*, const T*, Coef<acc_t<T>>, acc_t<T>*, unsigned*, acc_t<T>*, acc_t<T>*, int64_t, int64_t,     \
      int64_t, acc_t<T>, acc_t<T>);                                                                                    \
  template __global__ void adjoint_matching_reduce_kernel<T, V, kAmMemoryless>(                                        \
      const T*, const T*, const T*, Coef<acc_t<T>>, acc_t<T>*, unsigned*, acc_t<T>*, acc_t<T>*, int64_t, int64_t,     \
      int64_t, acc_t<T>, acc_t<T>);                                                                                    \
  template __global__ void adjoint_matching_control_kernel<T, V, kAmElementwise>(                                      \
      const T*, const T*, const T*, const acc_t<T>*, T*, acc_t<T>*, unsigned*, acc_t<T>*, int64_t, int64_t, acc_t<T>,  \
      acc_t<T>, acc_t<T>, acc_t<T>, acc_t<T>, bool);                                                                   \
  template __global__ void adjoint_matching_control_kernel<T, V, kAmNorm>(                                             \
      const T*, const T*, const T*, const acc_t<T>*, T*, acc_t<T>*, unsigned*, acc_t<T>*, int64_t, int64_t, acc_t<T>,  \
      acc_t<T>, acc_t<T>, acc_t<T>, acc_t<T>, bool);                                                                   \
  template __global__ void adjoint_matching_memoryless_grad_kernel<T, V>(                                              \
      const T*, const T*, const T*, Coef<acc_t<T>>, const acc_t<T>*, T*, int64_t, int64_t, acc_t<T>, acc_t<T>);       \
  template __global__ void adjoint_matching_memoryless_fused_kernel<T, V>(                                             \
      const T*, const T*, const T*, Coef<acc_t<T>>, acc_t<T>*, unsigned*, acc_t<T>*, T*, int64_t, acc_t<T>, acc_t<T>);
FK_INSTANTIATE_ADJOINT_MATCHING(float, true)
FK_INSTANTIATE_ADJOINT_MATCHING(float, false)
FK_INSTANTIATE_ADJOINT_MATCHING(double, true)
FK_INSTANTIATE_ADJOINT_MATCHING(double, false)
FK_INSTANTIATE_ADJOINT_MATCHING(__nv_bfloat16, true)
FK_INSTANTIATE_ADJOINT_MATCHING(__nv_bfloat16, false)
FK_INSTANTIATE_ADJOINT_MATCHING(__half, true)
FK_INSTANTIATE_ADJOINT_MATCHING(__half, false)
}  // namespace cuda
}  // namespace flowkern

// ---- consistency_probes (M20), consistency_residual (M17, M18, M20), consistency_residual_exact (M21) ----
#include "../../flowkern/ops/consistency_residual/kernel.cuh"  // includes consistency_probes/kernel.cuh

namespace flowkern {
namespace cuda {
#define FK_INSTANTIATE_CONSISTENCY(T, V)                                                                              \
  template __global__ void consistency_probe_norms_kernel<T, V>(const T*, const T*, const T*, Coef<acc_t<T>>,          \
                                                                acc_t<T>*, int64_t, int64_t, acc_t<T>, int);          \
  template __global__ void consistency_probe_write_kernel<T, V>(const T*, const T*, const T*, const T*,               \
                                                                Coef<acc_t<T>>, const acc_t<T>*, acc_t<T>*,           \
                                                                acc_t<T>*, acc_t<T>*, acc_t<T>*, int64_t, int64_t,    \
                                                                acc_t<T>, int, acc_t<T>);                             \
  template __global__ void consistency_residual_kernel<T, V>(ConsistencyInputs<T>, Coef<acc_t<T>>, Coef<acc_t<T>>,    \
                                                             Coef<acc_t<T>>, acc_t<T>*, LossOutputs<acc_t<T>>,        \
                                                             int64_t, int64_t, acc_t<T>, int, acc_t<T>, acc_t<T>,     \
                                                             acc_t<T>);                                               \
  template __global__ void consistency_residual_backward_kernel<T, V>(                                                \
      const acc_t<T>*, const T*, Coef<acc_t<T>>, Coef<acc_t<T>>, Coef<acc_t<T>>, const acc_t<T>*, const acc_t<T>*,    \
      T*, T*, T*, int64_t, int64_t, acc_t<T>, acc_t<T>, acc_t<T>);                                                    \
  template __global__ void consistency_residual_exact_kernel<T, V>(const T*, const T*, const T*, T*,                  \
                                                                   LossOutputs<acc_t<T>>, int64_t, int64_t, acc_t<T>);
FK_INSTANTIATE_CONSISTENCY(float, true)
FK_INSTANTIATE_CONSISTENCY(float, false)
FK_INSTANTIATE_CONSISTENCY(double, true)
FK_INSTANTIATE_CONSISTENCY(double, false)
FK_INSTANTIATE_CONSISTENCY(__nv_bfloat16, true)
FK_INSTANTIATE_CONSISTENCY(__nv_bfloat16, false)
FK_INSTANTIATE_CONSISTENCY(__half, true)
FK_INSTANTIATE_CONSISTENCY(__half, false)
}  // namespace cuda
}  // namespace flowkern
// ---- cfg_euler (M5, M2, M6, M30), adjoint_step (M23, M25, M31): every (velocity, state) pair, flag and path ----
#include "../../flowkern/ops/adjoint_step/kernel.cuh"  // includes cfg_euler/kernel.cuh

namespace flowkern {
namespace cuda {
#define FK_INSTANTIATE_STEP_FLAGS(TV, TX, CFG, ML, V)                                                                  \
  template __global__ void cfg_euler_kernel<TV, TX, CFG, ML, V>(const TV*, const TV*, const TX*, const TX*,            \
                                                                Coef<acc_t<TX>>, Coef<acc_t<TX>>, Coef<acc_t<TX>>,     \
                                                                Coef<acc_t<TX>>, Coef<acc_t<TX>>, TV*, TX*, TX*,       \
                                                                int64_t);                                              \
  template __global__ void adjoint_step_kernel<TV, TX, CFG, ML, V>(const TX*, const TV*, const TV*, Coef<acc_t<TX>>,   \
                                                                   Coef<acc_t<TX>>, Coef<acc_t<TX>>, acc_t<TX>*, TV*,  \
                                                                   int64_t, int64_t);
#define FK_INSTANTIATE_STEP_PATH(TV, TX, V)                                                                            \
  FK_INSTANTIATE_STEP_FLAGS(TV, TX, true, true, V)                                                                     \
  FK_INSTANTIATE_STEP_FLAGS(TV, TX, true, false, V)                                                                    \
  FK_INSTANTIATE_STEP_FLAGS(TV, TX, false, true, V)                                                                    \
  FK_INSTANTIATE_STEP_FLAGS(TV, TX, false, false, V)                                                                   \
  template __global__ void cfg_euler_backward_kernel<TV, TX, V>(const TV*, const TX*, const TX*, Coef<acc_t<TX>>,      \
                                                                Coef<acc_t<TX>>, Coef<acc_t<TX>>, Coef<acc_t<TX>>,     \
                                                                TV*, TV*, TX*, int64_t, CfgEulerBackwardFlags);        \
  template __global__ void adjoint_step_backward_kernel<TV, TX, V>(                                                    \
      const acc_t<TX>*, const TV*, Coef<acc_t<TX>>, Coef<acc_t<TX>>, Coef<acc_t<TX>>, TX*, TV*, TV*, int64_t,          \
      int64_t, AdjointStepBackwardFlags);
#define FK_INSTANTIATE_STEP(TV, TX)     \
  FK_INSTANTIATE_STEP_PATH(TV, TX, true) \
  FK_INSTANTIATE_STEP_PATH(TV, TX, false)
FK_INSTANTIATE_STEP(float, float)
FK_INSTANTIATE_STEP(double, double)
FK_INSTANTIATE_STEP(__nv_bfloat16, __nv_bfloat16)
FK_INSTANTIATE_STEP(__half, __half)
FK_INSTANTIATE_STEP(__nv_bfloat16, float)
FK_INSTANTIATE_STEP(__half, float)
}  // namespace cuda
}  // namespace flowkern
