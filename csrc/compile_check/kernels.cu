// Instantiates every torch-free CUDA kernel header so a CPU-only machine can compile-check them:
//   nvcc -c -std=c++20 -gencode arch=compute_90a,code=sm_90a -I csrc/include csrc/compile_check/kernels.cu
// Each op adds its kernel instantiations below (all element types, vector and scalar paths).
#include "../cuda/vggflow_matching_loss_kernel.cuh"

namespace flowkern {
namespace cuda {
#define FK_INSTANTIATE_MATCHING(T, V)                                                                   \
  template __global__ void vggflow_matching_loss_kernel<T, V>(const T*, const T*, const T*, const T*, \
                                                              const acc_t<T>*, T*, acc_t<T>*, int64_t,   \
                                                              int64_t, acc_t<T>, int, acc_t<T>);
FK_INSTANTIATE_MATCHING(float, true)
FK_INSTANTIATE_MATCHING(float, false)
FK_INSTANTIATE_MATCHING(double, true)
FK_INSTANTIATE_MATCHING(double, false)
FK_INSTANTIATE_MATCHING(__nv_bfloat16, true)
FK_INSTANTIATE_MATCHING(__nv_bfloat16, false)
FK_INSTANTIATE_MATCHING(__half, true)
FK_INSTANTIATE_MATCHING(__half, false)
}  // namespace cuda
}  // namespace flowkern
