// Torch-free CUDA helpers shared by the kernels (compile-checked with nvcc on CPU-only machines).
// 16-byte vectorized loads with a scalar tail, fp32 (fp64) accumulation, deterministic block sums.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace flowkern {
namespace cuda {

// Grid sizing: small tiles, so one SD3 1024 px sample (16 x 128 x 128 = 262144 elements) alone gives 1024 CTAs
// (>= 4 per SM on a 132-SM H100); 64 threads x one 16-byte fp32 pack cover a tile. Up to 32 CTAs per SM keep it full.
constexpr int kThreads = 64;
// Elements per (sample, chunk) tile: fixed (never depends on B), so reductions are batch-invariant and
// deterministic; the partials of a call are summed in index order by its last block.
constexpr int64_t kChunk = 256;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(x);
  else if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else return x;
}

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(x);
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else return x;
}

// N elements of T in one 16-byte transaction.
template <typename T>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

// The 16 bytes of a Pack as one uint4 value (scripts/cuda_compile_check.sh counts STG.E.128 in the SASS of every
// kernel with a 16-byte path, so the vector store cannot silently regress to 32-bit stores).
template <typename T>
union PackBits {
  Pack<T> pack;
  uint4 bits;
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  PackBits<T> u;
  u.bits = __ldg(reinterpret_cast<const uint4*>(p));
  return u.pack;
}

// One 16-byte global store. Explicit st.global.v4: nvcc 13 splits a plain uint4 store of assembled values into four
// 32-bit stores.
__device__ __forceinline__ void store16(void* p, uint4 v) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& x) {
  PackBits<T> u;
  u.pack = x;
  store16(p, u.bits);
}

__host__ __device__ constexpr int max_int(int a, int b) { return a > b ? a : b; }

// Elements per thread step in a mixed-type 16-byte path: one Pack of the narrowest type, whole Packs of the others.
template <typename T0, typename T1, typename T2 = T1>
__host__ __device__ constexpr int group_size() {
  return max_int(Pack<T0>::N, max_int(Pack<T1>::N, Pack<T2>::N));
}

// G elements at p (16-byte aligned, G a multiple of Pack<T>::N) converted to A.
template <int G, typename T, typename A>
__device__ __forceinline__ void load_group(const T* p, A* out) {
  constexpr int N = Pack<T>::N;
#pragma unroll
  for (int k = 0; k < G / N; ++k) {
    const Pack<T> pk = load_pack(p + k * N);
#pragma unroll
    for (int j = 0; j < N; ++j) out[k * N + j] = static_cast<A>(to_acc(pk.v[j]));
  }
}

template <int G, typename T, typename A>
__device__ __forceinline__ void store_group(T* p, const A* in) {
  constexpr int N = Pack<T>::N;
#pragma unroll
  for (int k = 0; k < G / N; ++k) {
    Pack<T> pk;
#pragma unroll
    for (int j = 0; j < N; ++j) pk.v[j] = from_acc<T>(in[k * N + j]);
    store_pack(p + k * N, pk);
  }
}

__host__ __device__ inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

__device__ __forceinline__ float eta_of(float t, int mode) { return mode == 0 ? t * t : (mode == 1 ? t : 1.f); }
__device__ __forceinline__ double eta_of(double t, int mode) { return mode == 0 ? t * t : (mode == 1 ? t : 1.0); }

// Sum over the block in a fixed tree order (deterministic). All threads get the result.
template <typename A>
__device__ __forceinline__ A block_sum(A x) {
  __shared__ A warp_sums[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  A total = 0;
  if (threadIdx.x < 32) {
    total = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : A(0);
    for (int off = 16; off > 0; off >>= 1) total += __shfl_xor_sync(0xffffffffu, total, off);
    if (threadIdx.x == 0) warp_sums[0] = total;
  }
  __syncthreads();
  total = warp_sums[0];
  __syncthreads();
  return total;
}

// The loss of a per-tile reduction, finished in the same launch: each block stores its partial, takes a ticket from
// `counter` (zeroed by the launcher), and the last block to finish sums every partial in index order (thread k the
// tiles k, k + kThreads, ..., then block_sum's fixed tree): deterministic whichever block comes last.
// Returns true in the last block, where `*total` then holds the sum.
template <typename A>
__device__ __forceinline__ bool last_block_sum(A block_total, A* partial, unsigned* counter, A* total) {
  __shared__ bool is_last;
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = block_total;
    __threadfence();  // publish the partial before taking the ticket
    is_last = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return false;
  __threadfence();
  A s = 0;
  for (unsigned i = threadIdx.x; i < gridDim.x; i += kThreads) s += __ldcg(partial + i);  // L2: other blocks' writes
  s = block_sum(s);
  *total = s;
  return true;
}

// Per-sample sums of per-(sample, chunk) partials, formed by the last block to finish (as last_block_sum):
// sums[b] = sum over its chunks in chunk order. Returns true in the last block, after sums is written.
template <typename A>
__device__ __forceinline__ bool last_block_sample_sums(A block_total, A* partial, unsigned* counter, A* sums,
                                                       int64_t batch, int64_t chunks) {
  __shared__ bool is_last;
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = block_total;
    __threadfence();
    is_last = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return false;
  __threadfence();
  for (int64_t b = 0; b < batch; ++b) {
    A s = 0;
    for (int64_t k = threadIdx.x; k < chunks; k += kThreads) s += __ldcg(partial + b * chunks + k);
    s = block_sum(s);
    if (threadIdx.x == 0) sums[b] = s;
  }
  __syncthreads();
  return true;
}

}  // namespace cuda
}  // namespace flowkern
