// gather_tokens: out[b, k] = x[b, ids_keep[b, k]] + pos[ids_keep[b, k]], one block row per kept token.
// Backward: each row of the [B, L, D] gradient written once (the kept token's gradient or zeros) through the
// inverse of ids_keep; the position gradient is a fixed-order sum over the batch (deterministic).
#include "common.cuh"
#include "ops.h"

namespace mae_fast {

template <typename T, int VEC, bool HAS_POS>
__global__ void gather_tokens_fwd_kernel(const T* __restrict__ x, const int64_t* __restrict__ ids,
                                         const float* __restrict__ pos, T* __restrict__ out, int64_t rows, int64_t K,
                                         int64_t L, int64_t D, int64_t sxb, int64_t sxl, int64_t sxd, int64_t spl,
                                         int64_t spd) {
  const int64_t chunks = D / VEC;
  for (int64_t row = blockIdx.y * (int64_t)blockDim.y + threadIdx.y; row < rows;
       row += (int64_t)gridDim.y * blockDim.y) {
    const int64_t b = row / K, l = ids[row];
    const bool ok = l >= 0 && l < L;
    for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q < chunks; q += (int64_t)gridDim.x * blockDim.x) {
      const int64_t d = q * VEC;
      Vec<T, VEC> v;
      if (ok) {
        if (VEC > 1) {
          v = *reinterpret_cast<const Vec<T, VEC>*>(x + b * sxb + l * sxl + d);
        } else {
          v.v[0] = x[b * sxb + l * sxl + d * sxd];
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          float value = static_cast<float>(v.v[e]);
          if (HAS_POS) value += pos[l * spl + (d + e) * spd];
          v.v[e] = static_cast<T>(value);
        }
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v.v[e] = T(0);
      }
      *reinterpret_cast<Vec<T, VEC>*>(out + row * D + d) = v;
    }
  }
}

template <typename T, int VEC>
__global__ void gather_tokens_bwd_kernel(const T* __restrict__ grad_out, const int32_t* __restrict__ inv,
                                         T* __restrict__ grad_x, int64_t rows, int64_t K, int64_t L, int64_t D) {
  const int64_t chunks = D / VEC;
  for (int64_t row = blockIdx.y * (int64_t)blockDim.y + threadIdx.y; row < rows;
       row += (int64_t)gridDim.y * blockDim.y) {
    const int64_t b = row / L, k = inv[row];
    const bool kept = k >= 0 && k < K;
    for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q < chunks; q += (int64_t)gridDim.x * blockDim.x) {
      Vec<T, VEC> v;
      if (kept) {
        v = *reinterpret_cast<const Vec<T, VEC>*>(grad_out + (b * K + k) * D + q * VEC);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v.v[e] = T(0);
      }
      *reinterpret_cast<Vec<T, VEC>*>(grad_x + row * D + q * VEC) = v;
    }
  }
}

at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& ids_keep, const std::optional<at::Tensor>& pos) {
  MAE_CHECK_CUDA(x, "x");
  MAE_CHECK_DIM(x, 3, "x");
  MAE_CHECK_FLOAT(x, "x");
  MAE_CHECK_DIM(ids_keep, 2, "ids_keep");
  MAE_CHECK_INDEX(ids_keep, "ids_keep");
  MAE_CHECK_SAME_DEVICE(x, ids_keep, "x", "ids_keep");
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  TORCH_CHECK(ids_keep.size(0) == B, "ids_keep has batch size ", ids_keep.size(0), " but x has ", B);
  if (pos) {
    MAE_CHECK_SAME_DEVICE(x, *pos, "x", "pos_embed");
    MAE_CHECK_FLOAT(*pos, "pos_embed");
    TORCH_CHECK(pos->dim() == 2 && pos->size(0) == L && pos->size(1) == D, "pos_embed must have shape [", L, ", ", D,
                "], got ", pos->sizes());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const auto ids = as_long_indices(ids_keep);
  const int64_t K = ids.size(1);
  auto out = at::empty({B, K, D}, x.options());
  if (B * K * D == 0) return out;
  // The position table is read as float32, the dtype the sum is computed in.
  const at::Tensor table = pos ? pos->to(at::kFloat) : at::empty({1}, x.options().dtype(at::kFloat));
  const int64_t spl = pos ? table.stride(0) : 0, spd = pos ? table.stride(1) : 0;
  MAE_DISPATCH_FLOATS(x.scalar_type(), "gather_tokens_cuda", [&] {
    using T = scalar_t;
    constexpr int V = vec_width<T>();
    const bool vectorized = x.stride(2) == 1 && D % V == 0 && x.stride(1) % V == 0 && x.stride(0) % V == 0 &&
                            aligned16(x.data_ptr());
    dim3 grid, block;
    row_launch_shape(B * K, D / (vectorized ? V : 1), grid, block);
    const auto launch = [&](auto kernel) {
      kernel<<<grid, block, 0, current_stream()>>>(x.data_ptr<T>(), ids.data_ptr<int64_t>(), table.data_ptr<float>(),
                                                   out.data_ptr<T>(), B * K, K, L, D, x.stride(0), x.stride(1),
                                                   x.stride(2), spl, spd);
    };
    if (vectorized && pos) launch(gather_tokens_fwd_kernel<T, V, true>);
    else if (vectorized) launch(gather_tokens_fwd_kernel<T, V, false>);
    else if (pos) launch(gather_tokens_fwd_kernel<T, 1, true>);
    else launch(gather_tokens_fwd_kernel<T, 1, false>);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor gather_tokens_cuda_backward(const at::Tensor& grad_out_in, const at::Tensor& ids_keep, int64_t length) {
  MAE_CHECK_CUDA(grad_out_in, "grad_out");
  MAE_CHECK_DIM(grad_out_in, 3, "grad_out");
  MAE_CHECK_FLOAT(grad_out_in, "grad_out");
  MAE_CHECK_DIM(ids_keep, 2, "ids_keep");
  MAE_CHECK_INDEX(ids_keep, "ids_keep");
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const auto grad_out = grad_out_in.contiguous();
  const auto ids = as_long_indices(ids_keep);
  const int64_t B = grad_out.size(0), K = grad_out.size(1), D = grad_out.size(2);
  auto grad_x = at::empty({B, length, D}, grad_out.options());
  if (B * length * D == 0) return grad_x;
  const auto inv = invert_index(ids, length);
  MAE_DISPATCH_FLOATS(grad_out.scalar_type(), "gather_tokens_cuda_backward", [&] {
    constexpr int V = vec_width<scalar_t>();
    // contiguous() returns an offset view as it is: check its alignment, not only D (vectorizable()).
    const bool vectorized = vectorizable(grad_out, V);
    dim3 grid, block;
    row_launch_shape(B * length, D / (vectorized ? V : 1), grid, block);
    auto stream = current_stream();
    if (vectorized) {
      gather_tokens_bwd_kernel<scalar_t, V><<<grid, block, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), inv.data_ptr<int32_t>(), grad_x.data_ptr<scalar_t>(), B * length, K, length, D);
    } else {
      gather_tokens_bwd_kernel<scalar_t, 1><<<grid, block, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), inv.data_ptr<int32_t>(), grad_x.data_ptr<scalar_t>(), B * length, K, length, D);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_x;
}

}  // namespace mae_fast
