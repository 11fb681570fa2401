// restore_tokens: out[b, l] = (x_visible[b, r] if r < K else mask_token) + pos[l], r = ids_restore[b, l].
// Forward writes each output row once. Backward reads each gradient row once: visible rows go to their slot of
// grad_x_visible (ids_restore is a permutation, so slots never collide), mask-token rows are summed per
// (sample, chunk of L) and the partial sums are reduced in a fixed order: deterministic, no atomics.
#include "common.cuh"
#include "ops.h"

namespace mae_fast {

constexpr int kChunkL = 16;

template <typename T, typename TO, bool HAS_POS>
__global__ void restore_tokens_fwd_kernel(const T* __restrict__ x, const int64_t* __restrict__ ids,
                                          const float* __restrict__ token, const float* __restrict__ pos,
                                          TO* __restrict__ out,
                                          int64_t rows, int64_t K, int64_t L, int64_t D, int64_t sxb, int64_t sxk,
                                          int64_t sxd, int64_t spl, int64_t spd) {
  for (int64_t row = blockIdx.y * (int64_t)blockDim.y + threadIdx.y; row < rows;
       row += (int64_t)gridDim.y * blockDim.y) {
    const int64_t b = row / L, l = row % L, r = ids[row];
    const bool visible = r >= 0 && r < K;
    for (int64_t d = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; d < D; d += (int64_t)gridDim.x * blockDim.x) {
      float value = visible ? static_cast<float>(x[b * sxb + r * sxk + d * sxd]) : token[d];
      if (HAS_POS) value += pos[l * spl + d * spd];
      out[row * D + d] = static_cast<TO>(value);
    }
  }
}

template <typename TG, typename TX>
__global__ void restore_tokens_bwd_kernel(const TG* __restrict__ grad_out, const int64_t* __restrict__ ids,
                                          TX* __restrict__ grad_x, float* __restrict__ partial, int64_t K, int64_t L,
                                          int64_t D, int64_t n_chunks) {
  const int64_t b = blockIdx.y, chunk = blockIdx.z;
  const int64_t d = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (d >= D) return;
  float masked_sum = 0.f;
  const int64_t l_end = std::min<int64_t>(L, (chunk + 1) * kChunkL);
  for (int64_t l = chunk * kChunkL; l < l_end; ++l) {
    const int64_t r = ids[b * L + l];
    const TG g = grad_out[(b * L + l) * D + d];
    if (r >= 0 && r < K) {
      grad_x[(b * K + r) * D + d] = static_cast<TX>(static_cast<float>(g));
    } else {
      masked_sum += static_cast<float>(g);
    }
  }
  partial[(b * n_chunks + chunk) * D + d] = masked_sum;
}

at::Tensor restore_tokens_cuda(const at::Tensor& x_visible, const at::Tensor& ids_restore, const at::Tensor& mask_token,
                               const std::optional<at::Tensor>& pos, std::optional<at::ScalarType> out_dtype) {
  MAE_CHECK_CUDA(x_visible, "x_visible");
  MAE_CHECK_DIM(x_visible, 3, "x_visible");
  MAE_CHECK_FLOAT(x_visible, "x_visible");
  MAE_CHECK_DIM(ids_restore, 2, "ids_restore");
  MAE_CHECK_INDEX(ids_restore, "ids_restore");
  MAE_CHECK_FLOAT(mask_token, "mask_token");
  MAE_CHECK_SAME_DEVICE(x_visible, ids_restore, "x_visible", "ids_restore");
  MAE_CHECK_SAME_DEVICE(x_visible, mask_token, "x_visible", "mask_token");
  const int64_t B = x_visible.size(0), K = x_visible.size(1), D = x_visible.size(2), L = ids_restore.size(1);
  TORCH_CHECK(ids_restore.size(0) == B, "ids_restore has batch size ", ids_restore.size(0), " but x_visible has ", B);
  TORCH_CHECK(K <= L, "x_visible has ", K, " tokens but ids_restore has only ", L, " positions");
  TORCH_CHECK(mask_token.numel() == D, "mask_token must have ", D, " elements, got shape ", mask_token.sizes());
  if (pos) {
    MAE_CHECK_SAME_DEVICE(x_visible, *pos, "x_visible", "pos_embed");
    MAE_CHECK_FLOAT(*pos, "pos_embed");
    TORCH_CHECK(pos->dim() == 2 && pos->size(0) == L && pos->size(1) == D, "pos_embed must have shape [", L, ", ", D,
                "], got ", pos->sizes());
  }
  const auto dtype = out_dtype.value_or(x_visible.scalar_type());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "out_dtype must be float32, float16 or bfloat16, got ", dtype);
  const c10::cuda::CUDAGuard guard(x_visible.device());
  const auto ids = as_long_indices(ids_restore);
  // The mask token and the position table are small: read them as float32 (what the sum is computed in).
  const auto token = mask_token.reshape({D}).to(at::kFloat).contiguous();
  const at::Tensor table = pos ? pos->to(at::kFloat) : token;
  auto out = at::empty({B, L, D}, x_visible.options().dtype(dtype));
  if (B * L * D == 0) return out;
  const int64_t spl = pos ? table.stride(0) : 0, spd = pos ? table.stride(1) : 0;
  const int tx = static_cast<int>(std::min<int64_t>(D, 256)), ty = std::max(1, 256 / tx);
  const dim3 block(tx, ty), grid(num_blocks(D, tx, 65535), num_blocks(B * L, ty, 65535));
  auto stream = current_stream();
  MAE_DISPATCH_FLOATS(x_visible.scalar_type(), "restore_tokens_cuda", [&] {
    using T = scalar_t;
    MAE_DISPATCH_FLOATS(dtype, "restore_tokens_cuda_out", [&] {
      using TO = scalar_t;
      if (pos) {
        restore_tokens_fwd_kernel<T, TO, true><<<grid, block, 0, stream>>>(
            x_visible.data_ptr<T>(), ids.data_ptr<int64_t>(), token.data_ptr<float>(), table.data_ptr<float>(),
            out.data_ptr<TO>(), B * L, K, L, D, x_visible.stride(0), x_visible.stride(1), x_visible.stride(2), spl, spd);
      } else {
        restore_tokens_fwd_kernel<T, TO, false><<<grid, block, 0, stream>>>(
            x_visible.data_ptr<T>(), ids.data_ptr<int64_t>(), token.data_ptr<float>(), table.data_ptr<float>(),
            out.data_ptr<TO>(), B * L, K, L, D, x_visible.stride(0), x_visible.stride(1), x_visible.stride(2), spl, spd);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> restore_tokens_cuda_backward(const at::Tensor& grad_out_in,
                                                                const at::Tensor& ids_restore, int64_t num_visible,
                                                                at::ScalarType x_dtype) {
  MAE_CHECK_CUDA(grad_out_in, "grad_out");
  MAE_CHECK_DIM(grad_out_in, 3, "grad_out");
  MAE_CHECK_FLOAT(grad_out_in, "grad_out");
  MAE_CHECK_DIM(ids_restore, 2, "ids_restore");
  MAE_CHECK_INDEX(ids_restore, "ids_restore");
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const auto grad_out = grad_out_in.contiguous();
  const auto ids = as_long_indices(ids_restore);
  const int64_t B = grad_out.size(0), L = grad_out.size(1), D = grad_out.size(2), K = num_visible;
  TORCH_CHECK(K >= 0 && K <= L, "num_visible must be in [0, ", L, "], got ", K);
  auto grad_x = at::empty({B, K, D}, grad_out.options().dtype(x_dtype));
  const int64_t n_chunks = (L + kChunkL - 1) / kChunkL;
  auto partial = at::empty({B, n_chunks, D}, grad_out.options().dtype(at::kFloat));
  if (B * L * D == 0) return {grad_x, at::zeros({D}, grad_out.options().dtype(at::kFloat))};
  const int tx = static_cast<int>(std::min<int64_t>(D, 256));
  const dim3 block(tx), grid(num_blocks(D, tx, 65535), B, n_chunks);
  auto stream = current_stream();
  MAE_DISPATCH_FLOATS(grad_out.scalar_type(), "restore_tokens_cuda_backward", [&] {
    using TG = scalar_t;
    MAE_DISPATCH_FLOATS(x_dtype, "restore_tokens_cuda_backward_x", [&] {
      restore_tokens_bwd_kernel<TG, scalar_t><<<grid, block, 0, stream>>>(
          grad_out.data_ptr<TG>(), ids.data_ptr<int64_t>(), grad_x.data_ptr<scalar_t>(), partial.data_ptr<float>(), K,
          L, D, n_chunks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_x, partial.sum(at::IntArrayRef({0, 1}))};
}

}  // namespace mae_fast
