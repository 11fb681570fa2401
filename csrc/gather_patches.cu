// gather_patches: the kept patches of an image batch as [B, K, C*p*p] rows in Conv2d weight order (c, i, j), in the
// dtype the embedding consumes; uint8 images normalized on the fly.
// Forward: one block per kept patch; runs of pixels move as vectors when the image is contiguous and p and W allow
// it. Backward: one block per image patch writes its gradient (a kept patch's row or zeros), pulled
// through the inverse of ids_keep: every gradient element written once, no atomics.
#include "common.cuh"
#include "ops.h"

namespace mae_fast {

// T: the image dtype (float or uint8), TO: the rows' dtype. uint8 pixels are normalized as they are read:
// (x - mean[c]) / std[c] in float32, correctly rounded, as when normalizing first.
template <typename T, typename TO, int VEC>
__global__ void gather_patches_fwd_kernel(const T* __restrict__ imgs, const int64_t* __restrict__ ids,
                                          const float* __restrict__ norm, TO* __restrict__ out, int64_t K, int64_t L,
                                          int64_t GW, int64_t C, int64_t P, int64_t sb, int64_t sc, int64_t sh,
                                          int64_t sw) {
  const int64_t row = blockIdx.x, b = row / K, k = row % K;
  const int64_t l = ids[b * K + k];
  const bool ok = l >= 0 && l < L;
  const int64_t h = ok ? l / GW : 0, w = ok ? l % GW : 0;
  const int PP = static_cast<int>(P * P), N = static_cast<int>(C) * PP, chunks = N / VEC;
  const T* src = imgs + b * sb + h * P * sh + w * P * sw;
  for (int q = threadIdx.x; q < chunks; q += blockDim.x) {
    const int n = q * VEC, c = n / PP, i = (n / static_cast<int>(P)) % static_cast<int>(P),
              j = n % static_cast<int>(P);
    float v[VEC];
    if (ok) {
      if (VEC > 1) {
        load_as_float<T, VEC>(src + c * sc + i * sh + j, v);
      } else {
        v[0] = static_cast<float>(src[c * sc + i * sh + j * sw]);
      }
      if constexpr (std::is_same_v<T, uint8_t>) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = __fdiv_rn(v[e] - norm[c], norm[C + c]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] = 0.f;
    }
    store_from_float<TO, VEC>(out + row * N + n, v);
  }
}

// TG: the rows' gradient dtype, TI: the image gradient's.
template <typename TG, typename TI, int VEC>
__global__ void gather_patches_bwd_kernel(const TG* __restrict__ grad_out, const int32_t* __restrict__ inv,
                                          TI* __restrict__ grad_imgs, int64_t K, int64_t L, int64_t GW, int64_t C,
                                          int64_t P, int64_t H, int64_t W) {
  const int64_t row = blockIdx.x, b = row / L, l = row % L;
  const int64_t k = inv[row];
  const bool kept = k >= 0 && k < K;
  const int64_t h = l / GW, w = l % GW;
  const int PP = static_cast<int>(P * P), N = static_cast<int>(C) * PP, chunks = N / VEC;
  TI* dst = grad_imgs + b * C * H * W + h * P * W + w * P;
  for (int q = threadIdx.x; q < chunks; q += blockDim.x) {
    const int n = q * VEC, c = n / PP, i = (n / static_cast<int>(P)) % static_cast<int>(P),
              j = n % static_cast<int>(P);
    float v[VEC];
    if (kept) {
      load_as_float<TG, VEC>(grad_out + (b * K + k) * N + n, v);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] = 0.f;
    }
    store_from_float<TI, VEC>(dst + c * H * W + i * W + j, v);
  }
}

static void check_patch_size(int64_t p, int64_t H, int64_t W) {
  TORCH_CHECK(p > 0 && H % p == 0 && W % p == 0, "patch_size=", p, " does not divide the image size ", H, "x", W);
}

at::Tensor gather_patches_cuda(const at::Tensor& imgs, const at::Tensor& ids_keep, int64_t patch_size,
                               const std::optional<at::Tensor>& norm, at::ScalarType out_dtype) {
  MAE_CHECK_CUDA(imgs, "imgs");
  MAE_CHECK_DIM(imgs, 4, "imgs");
  TORCH_CHECK(imgs.scalar_type() == at::kByte || imgs.scalar_type() == at::kFloat || imgs.scalar_type() == at::kHalf ||
                  imgs.scalar_type() == at::kBFloat16,
              "imgs must be float32, float16, bfloat16 or uint8, got ", imgs.scalar_type());
  TORCH_CHECK(imgs.scalar_type() != at::kByte || norm.has_value(), "uint8 imgs need norm (their mean and std)");
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
              "out_dtype must be float32, float16 or bfloat16, got ", out_dtype);
  MAE_CHECK_DIM(ids_keep, 2, "ids_keep");
  MAE_CHECK_INDEX(ids_keep, "ids_keep");
  MAE_CHECK_SAME_DEVICE(imgs, ids_keep, "imgs", "ids_keep");
  TORCH_CHECK(ids_keep.size(0) == imgs.size(0), "ids_keep has batch size ", ids_keep.size(0), " but imgs has ",
              imgs.size(0));
  const int64_t B = imgs.size(0), C = imgs.size(1), H = imgs.size(2), W = imgs.size(3), P = patch_size;
  check_patch_size(P, H, W);
  if (norm) {
    MAE_CHECK_SAME_DEVICE(imgs, *norm, "imgs", "norm");
    TORCH_CHECK(norm->scalar_type() == at::kFloat && norm->is_contiguous() && norm->numel() == 2 * C,
                "norm must be a contiguous float32 [2, ", C, "] tensor, got ", norm->sizes());
  }
  const c10::cuda::CUDAGuard guard(imgs.device());
  const auto ids = as_long_indices(ids_keep);
  const int64_t K = ids.size(1), N = C * P * P;
  auto out = at::empty({B, K, N}, imgs.options().dtype(out_dtype));
  if (B * K == 0) return out;
  const float* norm_ptr = norm ? norm->data_ptr<float>() : nullptr;
  MAE_DISPATCH_IMAGES(imgs.scalar_type(), "gather_patches_cuda", [&] {
    using T = scalar_t;
    MAE_DISPATCH_FLOATS(out_dtype, "gather_patches_cuda_out", [&] {
      using TO = scalar_t;
      constexpr int V = vec_width<T>() < 8 ? vec_width<T>() : 8;  // 8 uint8 pixels: 8 bytes in, 16-32 bytes out
      // Runs of V pixels along an image row move as one access: the image rows must allow it (and so must the
      // fresh output, whose rows start at multiples of N).
      const bool vectorized = imgs.stride(3) == 1 && P % V == 0 && W % V == 0 && N % V == 0 &&
                              imgs.stride(2) % V == 0 && imgs.stride(1) % V == 0 && imgs.stride(0) % V == 0 &&
                              aligned_to(imgs.data_ptr(), V * sizeof(T));
      const dim3 grid(B * K), block(128);
      const auto launch = [&](auto kernel) {
        kernel<<<grid, block, 0, current_stream()>>>(imgs.data_ptr<T>(), ids.data_ptr<int64_t>(), norm_ptr,
                                                     out.data_ptr<TO>(), K, (H / P) * (W / P), W / P, C, P,
                                                     imgs.stride(0), imgs.stride(1), imgs.stride(2), imgs.stride(3));
      };
      if (vectorized) launch(gather_patches_fwd_kernel<T, TO, V>);
      else launch(gather_patches_fwd_kernel<T, TO, 1>);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor gather_patches_cuda_backward(const at::Tensor& grad_out_in, const at::Tensor& ids_keep, int64_t patch_size,
                                        int64_t height, int64_t width, at::ScalarType imgs_dtype) {
  MAE_CHECK_CUDA(grad_out_in, "grad_out");
  MAE_CHECK_DIM(grad_out_in, 3, "grad_out");
  MAE_CHECK_FLOAT(grad_out_in, "grad_out");
  MAE_CHECK_DIM(ids_keep, 2, "ids_keep");
  MAE_CHECK_INDEX(ids_keep, "ids_keep");
  TORCH_CHECK(imgs_dtype == at::kFloat || imgs_dtype == at::kHalf || imgs_dtype == at::kBFloat16,
              "imgs_dtype must be float32, float16 or bfloat16, got ", imgs_dtype);
  const int64_t P = patch_size;
  check_patch_size(P, height, width);
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const auto grad_out = grad_out_in.contiguous();
  const auto ids = as_long_indices(ids_keep);
  const int64_t B = grad_out.size(0), K = grad_out.size(1), N = grad_out.size(2);
  TORCH_CHECK(N % (P * P) == 0, "grad_out's last dimension ", N, " is not a multiple of patch_size**2");
  const int64_t C = N / (P * P), GW = width / P, L = (height / P) * GW;
  auto grad_imgs = at::empty({B, C, height, width}, grad_out.options().dtype(imgs_dtype));
  if (B * L == 0) return grad_imgs;
  const auto inv = invert_index(ids, L);
  MAE_DISPATCH_FLOATS(grad_out.scalar_type(), "gather_patches_cuda_backward", [&] {
    using TG = scalar_t;
    MAE_DISPATCH_FLOATS(imgs_dtype, "gather_patches_cuda_backward_imgs", [&] {
      using TI = scalar_t;
      constexpr int V = vec_width<TG>() < vec_width<TI>() ? vec_width<TG>() : vec_width<TI>();
      // contiguous() hands back the tensor itself when it is contiguous, and a contiguous view may start anywhere
      // (an offset into a larger buffer): vector loads need its start aligned, so check it (vectorizable()).
      const bool vectorized = P % V == 0 && width % V == 0 && vectorizable(grad_out, V);
      const dim3 grid(B * L), block(128);
      const auto launch = [&](auto kernel) {
        kernel<<<grid, block, 0, current_stream()>>>(grad_out.data_ptr<TG>(), inv.data_ptr<int32_t>(),
                                                     grad_imgs.data_ptr<TI>(), K, L, GW, C, P, height, width);
      };
      if (vectorized) launch(gather_patches_bwd_kernel<TG, TI, V>);
      else launch(gather_patches_bwd_kernel<TG, TI, 1>);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_imgs;
}

}  // namespace mae_fast
