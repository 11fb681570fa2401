// Helpers shared by the mae_fast CUDA ops: input checks, 16-byte vectors, block reductions.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace mae_fast {

#define MAE_CHECK_CUDA(t, name) TORCH_CHECK((t).is_cuda(), name " must be a CUDA tensor, got device ", (t).device())
#define MAE_CHECK_DIM(t, n, name) \
  TORCH_CHECK((t).dim() == (n), name " must have " #n " dimensions, got shape ", (t).sizes())
#define MAE_CHECK_FLOAT(t, name)                                                                             \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||                          \
                  (t).scalar_type() == at::kBFloat16,                                                       \
              name " must be float32, float16 or bfloat16, got ", (t).scalar_type())
#define MAE_CHECK_INDEX(t, name)                                                                              \
  TORCH_CHECK((t).scalar_type() == at::kLong || (t).scalar_type() == at::kInt,                              \
              name " must hold int64 or int32 indices, got ", (t).scalar_type())
#define MAE_CHECK_SAME_DEVICE(a, b, name_a, name_b) \
  TORCH_CHECK((a).device() == (b).device(), name_b " is on ", (b).device(), " but " name_a " is on ", (a).device())

// float32, float16 and bfloat16 only (the dtypes the ops accept).
#define MAE_DISPATCH_FLOATS(TYPE, NAME, ...)                                                          \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)                  \
                                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)               \
                                         AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

// Images: the float dtypes and uint8 (pixels the ops normalize as they read them).
#define MAE_DISPATCH_IMAGES(TYPE, NAME, ...)                                                         \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)                 \
                                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)              \
                                         AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__)      \
                                             AT_DISPATCH_CASE(at::ScalarType::Byte, __VA_ARGS__))

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// Indices as contiguous int64 (a no-op for the int64 indices the model makes).
inline at::Tensor as_long_indices(const at::Tensor& ids) { return ids.to(at::kLong).contiguous(); }

// A group of VEC elements moved as one 16-byte (or smaller) access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T>
constexpr int vec_width() {
  return 16 / sizeof(T);
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

inline bool aligned_to(const void* p, std::size_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

// Whether t's rows (its last dimension) can be read in vectors of `vec` elements: unit stride along them, every
// other stride and the row length a multiple of vec, and the first element aligned to the vector's size (at most
// 16 bytes). A contiguous tensor can still start at any element of its storage (a view at an offset), so the
// pointer is checked, not assumed. Registered as mae_fast::vectorizable so tests check it on any device.
inline bool vectorizable(const at::Tensor& t, int64_t vec) {
  if (vec <= 1) return true;
  if (t.dim() == 0 || t.stride(-1) != 1 || t.size(-1) % vec != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) % vec != 0) return false;
  }
  const std::size_t bytes = std::min<std::size_t>(16, static_cast<std::size_t>(vec) * t.element_size());
  return aligned_to(t.data_ptr(), bytes);
}

// VEC consecutive elements at p, converted to float32, in accesses of at most 16 bytes. For VEC > 1, p must be
// aligned to VEC * sizeof(T) bytes (or 16, whichever is smaller); VEC == 1 is a plain scalar load.
template <typename T, int VEC>
__device__ __forceinline__ void load_as_float(const T* __restrict__ p, float* out) {
  constexpr int PIECE = VEC * static_cast<int>(sizeof(T)) <= 16 ? VEC : 16 / static_cast<int>(sizeof(T));
#pragma unroll
  for (int k = 0; k < VEC; k += PIECE) {
    const Vec<T, PIECE> v = *reinterpret_cast<const Vec<T, PIECE>*>(p + k);
#pragma unroll
    for (int e = 0; e < PIECE; ++e) out[k + e] = static_cast<float>(v.v[e]);
  }
}

// The inverse of load_as_float: VEC float32 values written to p as T, same alignment rule.
template <typename T, int VEC>
__device__ __forceinline__ void store_from_float(T* __restrict__ p, const float* in) {
  constexpr int PIECE = VEC * static_cast<int>(sizeof(T)) <= 16 ? VEC : 16 / static_cast<int>(sizeof(T));
#pragma unroll
  for (int k = 0; k < VEC; k += PIECE) {
    Vec<T, PIECE> v;
#pragma unroll
    for (int e = 0; e < PIECE; ++e) v.v[e] = static_cast<T>(in[k + e]);
    *reinterpret_cast<Vec<T, PIECE>*>(p + k) = v;
  }
}

inline int num_blocks(int64_t work, int per_block, int64_t cap = 1 << 20) {
  int64_t blocks = (work + per_block - 1) / per_block;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

// Row kernels: threads along a row (in vectors of `chunks` per row), rows along y, enough rows per block to fill
// it when a row is short.
inline void row_launch_shape(int64_t rows, int64_t chunks, dim3& grid, dim3& block) {
  const int tx = static_cast<int>(std::min<int64_t>(std::max<int64_t>(chunks, 1), 128));
  const int ty = std::max(1, 256 / tx);
  block = dim3(tx, ty);
  grid = dim3(num_blocks(chunks, tx, 65535), num_blocks(rows, ty, 65535));
}

// Sum over the block; every thread gets the result. `scratch` holds at least 32 floats.
__device__ __forceinline__ float block_sum(float value, float* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffff, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < warps; ++w) total += scratch[w];  // the same order in every thread: deterministic
  return total;
}

}  // namespace mae_fast
