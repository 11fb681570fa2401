// restore_tokens: out[b, l] = (x_visible[b, r] if r < K else mask_token) + pos[l], r = ids_restore[b, l].
// Forward writes each output row once. Backward reads each gradient row once: visible rows go to their slot of
// grad_x_visible (ids_restore is a permutation, so slots never collide), mask-token rows are summed per block, and a
// second small kernel adds the blocks' sums in fixed slices combined in a fixed order: deterministic, no atomics.
#include "common.cuh"
#include "ops.h"

namespace mae_fast {

// VEC > 1: x_visible's rows are contiguous along D, D % VEC == 0 and every base pointer is 16-byte aligned (the
// host checks), so each thread moves VEC elements per access; VEC == 1 follows any strides of x_visible.
// The mask token [D] and the position table [L, D] are contiguous float32.
template <typename T, typename TO, int VEC, bool HAS_POS>
__global__ void restore_tokens_fwd_kernel(const T* __restrict__ x, const int64_t* __restrict__ ids,
                                          const float* __restrict__ token, const float* __restrict__ pos,
                                          TO* __restrict__ out, int64_t rows, int64_t K, int64_t L, int64_t D,
                                          int64_t sxb, int64_t sxk, int64_t sxd) {
  const int64_t chunks = D / VEC;
  for (int64_t row = blockIdx.y * (int64_t)blockDim.y + threadIdx.y; row < rows;
       row += (int64_t)gridDim.y * blockDim.y) {
    const int64_t b = row / L, l = row % L, r = ids[row];
    const bool visible = r >= 0 && r < K;
    for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q < chunks; q += (int64_t)gridDim.x * blockDim.x) {
      const int64_t d = q * VEC;
      float value[VEC];
      if (!visible) {
        load_as_float<float, VEC>(token + d, value);
      } else if (VEC > 1) {
        load_as_float<T, VEC>(x + b * sxb + r * sxk + d, value);
      } else {
        value[0] = static_cast<float>(x[b * sxb + r * sxk + d * sxd]);
      }
      if (HAS_POS) {
        float p[VEC];
        load_as_float<float, VEC>(pos + l * D + d, p);
#pragma unroll
        for (int e = 0; e < VEC; ++e) value[e] += p[e];
      }
      store_from_float<TO, VEC>(out + row * D + d, value);
    }
  }
}

// One pass over the gradient: block g takes the contiguous run of rows [g * per_block, (g + 1) * per_block) of the
// B * L rows; a thread owns VEC-wide column chunks and walks the block's rows (threadIdx.y interleaved), UNROLL rows
// at a time so that several 16-byte loads are in flight per thread. Visible rows are stored into their slot of
// grad_x; mask-token rows are summed in registers (in row order), then over threadIdx.y in shared memory (in y
// order), into the block's partial sum partial[g, :]. restore_tokens_token_sum_kernel then adds the partial sums.
// VEC > 1 needs D % VEC == 0 and an aligned grad_out (the other buffers are fresh allocations).
constexpr int kBwdUnroll = 4;

template <typename TG, typename TX, int VEC>
__global__ void restore_tokens_bwd_kernel(const TG* __restrict__ grad_out, const int64_t* __restrict__ ids,
                                          TX* __restrict__ grad_x, float* __restrict__ partial, int64_t rows,
                                          int64_t per_block, int64_t K, int64_t L, int64_t D) {
  extern __shared__ float sums[];  // [blockDim.y, D]
  const int64_t first = blockIdx.x * per_block, last = std::min<int64_t>(rows, first + per_block);
  const int64_t step = blockDim.y;
  for (int64_t q = threadIdx.x; q < D / VEC; q += blockDim.x) {
    const int64_t d = q * VEC;
    float masked_sum[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) masked_sum[e] = 0.f;
    int64_t row = first + threadIdx.y;
    for (; row + (kBwdUnroll - 1) * step < last; row += kBwdUnroll * step) {
      float g[kBwdUnroll][VEC];
      int64_t r[kBwdUnroll];
#pragma unroll
      for (int u = 0; u < kBwdUnroll; ++u) {  // all loads first: kBwdUnroll rows in flight
        r[u] = ids[row + u * step];
        load_as_float<TG, VEC>(grad_out + (row + u * step) * D + d, g[u]);
      }
#pragma unroll
      for (int u = 0; u < kBwdUnroll; ++u) {  // then in row order, as the remainder loop below
        const int64_t b = (row + u * step) / L;
        if (r[u] >= 0 && r[u] < K) {
          store_from_float<TX, VEC>(grad_x + (b * K + r[u]) * D + d, g[u]);
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) masked_sum[e] += g[u][e];
        }
      }
    }
    for (; row < last; row += step) {
      const int64_t b = row / L, r = ids[row];
      float g[VEC];
      load_as_float<TG, VEC>(grad_out + row * D + d, g);
      if (r >= 0 && r < K) {
        store_from_float<TX, VEC>(grad_x + (b * K + r) * D + d, g);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) masked_sum[e] += g[e];
      }
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) sums[threadIdx.y * D + d + e] = masked_sum[e];
  }
  __syncthreads();
  const int threads = blockDim.x * blockDim.y, tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int64_t d = tid; d < D; d += threads) {
    float total = 0.f;
    for (unsigned y = 0; y < blockDim.y; ++y) total += sums[y * D + d];  // fixed order
    partial[blockIdx.x * D + d] = total;
  }
}

// The mask token's gradient from the G partial sums [G, D], spread over the GPU: block x takes kSumColumns columns;
// its threadIdx.y = s adds the fixed slice of partials [s * G / kSumSlices, (s + 1) * G / kSumSlices) in order, and
// thread y = 0 adds the slices' sums in slice order. The order depends only on G, so the result is deterministic.
constexpr int kSumColumns = 32, kSumSlices = 16;

__global__ void restore_tokens_token_sum_kernel(const float* __restrict__ partial, float* __restrict__ grad_token,
                                                int64_t G, int64_t D) {
  __shared__ float slice_sums[kSumSlices][kSumColumns];
  const int64_t d = blockIdx.x * (int64_t)kSumColumns + threadIdx.x;
  const int64_t begin = G * threadIdx.y / kSumSlices, end = G * (threadIdx.y + 1) / kSumSlices;
  float total = 0.f;
  if (d < D) {
    int64_t g = begin;
    for (; g + 3 < end; g += 4) {  // four independent loads in flight, added in order
      const float a = partial[g * D + d], b = partial[(g + 1) * D + d], c = partial[(g + 2) * D + d],
                  e = partial[(g + 3) * D + d];
      total += a;
      total += b;
      total += c;
      total += e;
    }
    for (; g < end; ++g) total += partial[g * D + d];
  }
  slice_sums[threadIdx.y][threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.y == 0 && d < D) {
    float sum = 0.f;
#pragma unroll
    for (int s = 0; s < kSumSlices; ++s) sum += slice_sums[s][threadIdx.x];  // slice order
    grad_token[d] = sum;
  }
}

// The widest vector both element types allow.
template <typename A, typename B>
constexpr int pair_vec_width() {
  return vec_width<A>() < vec_width<B>() ? vec_width<A>() : vec_width<B>();
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
  // The mask token and the position table are small: read them as contiguous float32 (what the sum is computed in).
  const auto token = mask_token.reshape({D}).to(at::kFloat).contiguous();
  const at::Tensor table = pos ? pos->to(at::kFloat).contiguous() : token;
  auto out = at::empty({B, L, D}, x_visible.options().dtype(dtype));
  if (B * L * D == 0) return out;
  auto stream = current_stream();
  MAE_DISPATCH_FLOATS(x_visible.scalar_type(), "restore_tokens_cuda", [&] {
    using T = scalar_t;
    MAE_DISPATCH_FLOATS(dtype, "restore_tokens_cuda_out", [&] {
      using TO = scalar_t;
      constexpr int V = pair_vec_width<T, TO>();
      const bool vectorized = D % V == 0 && x_visible.stride(2) == 1 && x_visible.stride(1) % V == 0 &&
                              x_visible.stride(0) % V == 0 && aligned16(x_visible.data_ptr()) &&
                              aligned16(token.data_ptr()) && aligned16(table.data_ptr());
      dim3 grid, block;
      row_launch_shape(B * L, D / (vectorized ? V : 1), grid, block);
      const auto launch = [&](auto kernel) {
        kernel<<<grid, block, 0, stream>>>(x_visible.data_ptr<T>(), ids.data_ptr<int64_t>(), token.data_ptr<float>(),
                                           table.data_ptr<float>(), out.data_ptr<TO>(), B * L, K, L, D,
                                           x_visible.stride(0), x_visible.stride(1), x_visible.stride(2));
      };
      if (vectorized && pos) launch(restore_tokens_fwd_kernel<T, TO, V, true>);
      else if (vectorized) launch(restore_tokens_fwd_kernel<T, TO, V, false>);
      else if (pos) launch(restore_tokens_fwd_kernel<T, TO, 1, true>);
      else launch(restore_tokens_fwd_kernel<T, TO, 1, false>);
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
  auto grad_token = at::empty({D}, grad_out.options().dtype(at::kFloat));
  if (B * L == 0 || D == 0) return {grad_x, grad_token.zero_()};
  const int64_t rows = B * L;
  int sms = 0, max_shared = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, grad_out.device().index()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlock, grad_out.device().index()));
  auto stream = current_stream();
  MAE_DISPATCH_FLOATS(grad_out.scalar_type(), "restore_tokens_cuda_backward", [&] {
    using TG = scalar_t;
    MAE_DISPATCH_FLOATS(x_dtype, "restore_tokens_cuda_backward_x", [&] {
      using TX = scalar_t;
      constexpr int V = pair_vec_width<TG, TX>();
      const bool vectorized = vectorizable(grad_out, V);
      const int64_t columns = D / (vectorized ? V : 1);
      const int tx = static_cast<int>(std::min<int64_t>(columns, 256));
      const auto kernel = vectorized ? restore_tokens_bwd_kernel<TG, TX, V> : restore_tokens_bwd_kernel<TG, TX, 1>;
      // Rows per thread block along y, as many as the shared sums [ty, D] allow: the device's per-block limit
      // without opting in (48 KiB), less the kernel's own static shared memory.
      cudaFuncAttributes attributes{};
      C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
      const int64_t shared_limit = static_cast<int64_t>(max_shared) - static_cast<int64_t>(attributes.sharedSizeBytes);
      TORCH_CHECK(D * 4 <= shared_limit, "restore_tokens_cuda_backward handles D up to ", shared_limit / 4,
                  " on this GPU, got ", D);
      int ty = std::max(1, 256 / tx);
      while (ty > 1 && static_cast<int64_t>(ty) * D * 4 > shared_limit) ty /= 2;
      // Four blocks per SM: full waves; the partial sums they leave are added by a second, small kernel.
      const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(4 * sms, (rows + ty - 1) / ty));
      const int64_t per_block = (rows + blocks - 1) / blocks;
      const int64_t grid_blocks = (rows + per_block - 1) / per_block;
      auto partial = at::empty({grid_blocks, D}, grad_out.options().dtype(at::kFloat));
      const size_t shared = static_cast<size_t>(ty) * D * sizeof(float);
      kernel<<<dim3(static_cast<unsigned>(grid_blocks)), dim3(tx, ty), shared, stream>>>(
          grad_out.data_ptr<TG>(), ids.data_ptr<int64_t>(), grad_x.data_ptr<TX>(), partial.data_ptr<float>(), rows,
          per_block, K, L, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      restore_tokens_token_sum_kernel<<<dim3(static_cast<unsigned>((D + kSumColumns - 1) / kSumColumns)),
                                        dim3(kSumColumns, kSumSlices), 0, stream>>>(
          partial.data_ptr<float>(), grad_token.data_ptr<float>(), grid_blocks, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_x, grad_token};
}

}  // namespace mae_fast
