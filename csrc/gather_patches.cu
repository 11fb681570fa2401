// gather_patches: the kept patches of an image batch as [B, K, C*p*p] rows in Conv2d weight order (c, i, j).
// Forward: one block per kept patch; runs of p pixels move as 16-byte vectors when the image is contiguous and
// p and W allow it. Backward: one block per image patch writes its gradient (a kept patch's row or zeros), pulled
// through the inverse of ids_keep: every gradient element written once, no atomics.
#include "common.cuh"
#include "ops.h"

namespace mae_fast {

template <typename T, int VEC>
__global__ void gather_patches_fwd_kernel(const T* __restrict__ imgs, const int64_t* __restrict__ ids,
                                          T* __restrict__ out, int64_t K, int64_t L, int64_t GW, int64_t C, int64_t P,
                                          int64_t sb, int64_t sc, int64_t sh, int64_t sw) {
  const int64_t row = blockIdx.x, b = row / K, k = row % K;
  const int64_t l = ids[b * K + k];
  const bool ok = l >= 0 && l < L;
  const int64_t h = ok ? l / GW : 0, w = ok ? l % GW : 0;
  const int64_t N = C * P * P, chunks = N / VEC;
  const T* src = imgs + b * sb + h * P * sh + w * P * sw;
  for (int64_t q = threadIdx.x; q < chunks; q += blockDim.x) {
    const int64_t n = q * VEC, c = n / (P * P), i = (n / P) % P, j = n % P;
    Vec<T, VEC> v;
    if (ok) {
      if (VEC > 1) {
        v = *reinterpret_cast<const Vec<T, VEC>*>(src + c * sc + i * sh + j);
      } else {
        v.v[0] = src[c * sc + i * sh + j * sw];
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) v.v[e] = T(0);
    }
    *reinterpret_cast<Vec<T, VEC>*>(out + row * N + n) = v;
  }
}

template <typename T, int VEC>
__global__ void gather_patches_bwd_kernel(const T* __restrict__ grad_out, const int32_t* __restrict__ inv,
                                          T* __restrict__ grad_imgs, int64_t K, int64_t L, int64_t GW, int64_t C,
                                          int64_t P, int64_t H, int64_t W) {
  const int64_t row = blockIdx.x, b = row / L, l = row % L;
  const int64_t k = inv[row];
  const bool kept = k >= 0 && k < K;
  const int64_t h = l / GW, w = l % GW, N = C * P * P, chunks = N / VEC;
  T* dst = grad_imgs + b * C * H * W + h * P * W + w * P;
  for (int64_t q = threadIdx.x; q < chunks; q += blockDim.x) {
    const int64_t n = q * VEC, c = n / (P * P), i = (n / P) % P, j = n % P;
    Vec<T, VEC> v;
    if (kept) {
      v = *reinterpret_cast<const Vec<T, VEC>*>(grad_out + (b * K + k) * N + n);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) v.v[e] = T(0);
    }
    *reinterpret_cast<Vec<T, VEC>*>(dst + c * H * W + i * W + j) = v;
  }
}

static void check_patch_size(int64_t p, int64_t H, int64_t W) {
  TORCH_CHECK(p > 0 && H % p == 0 && W % p == 0, "patch_size=", p, " does not divide the image size ", H, "x", W);
}

at::Tensor gather_patches_cuda(const at::Tensor& imgs, const at::Tensor& ids_keep, int64_t patch_size) {
  MAE_CHECK_CUDA(imgs, "imgs");
  MAE_CHECK_DIM(imgs, 4, "imgs");
  MAE_CHECK_FLOAT(imgs, "imgs");
  MAE_CHECK_DIM(ids_keep, 2, "ids_keep");
  MAE_CHECK_INDEX(ids_keep, "ids_keep");
  MAE_CHECK_SAME_DEVICE(imgs, ids_keep, "imgs", "ids_keep");
  TORCH_CHECK(ids_keep.size(0) == imgs.size(0), "ids_keep has batch size ", ids_keep.size(0), " but imgs has ",
              imgs.size(0));
  const int64_t B = imgs.size(0), C = imgs.size(1), H = imgs.size(2), W = imgs.size(3), P = patch_size;
  check_patch_size(P, H, W);
  const c10::cuda::CUDAGuard guard(imgs.device());
  const auto ids = as_long_indices(ids_keep);
  const int64_t K = ids.size(1), N = C * P * P;
  auto out = at::empty({B, K, N}, imgs.options());
  if (B * K == 0) return out;
  MAE_DISPATCH_FLOATS(imgs.scalar_type(), "gather_patches_cuda", [&] {
    constexpr int V = vec_width<scalar_t>();
    const bool vectorized = imgs.stride(3) == 1 && P % V == 0 && W % V == 0 && imgs.stride(2) % V == 0 &&
                            imgs.stride(1) % V == 0 && imgs.stride(0) % V == 0 && aligned16(imgs.data_ptr());
    const dim3 grid(B * K), block(128);
    auto stream = current_stream();
    if (vectorized) {
      gather_patches_fwd_kernel<scalar_t, V><<<grid, block, 0, stream>>>(
          imgs.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), K, (H / P) * (W / P), W / P,
          C, P, imgs.stride(0), imgs.stride(1), imgs.stride(2), imgs.stride(3));
    } else {
      gather_patches_fwd_kernel<scalar_t, 1><<<grid, block, 0, stream>>>(
          imgs.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), K, (H / P) * (W / P), W / P,
          C, P, imgs.stride(0), imgs.stride(1), imgs.stride(2), imgs.stride(3));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor gather_patches_cuda_backward(const at::Tensor& grad_out_in, const at::Tensor& ids_keep, int64_t patch_size,
                                        int64_t height, int64_t width) {
  MAE_CHECK_CUDA(grad_out_in, "grad_out");
  MAE_CHECK_DIM(grad_out_in, 3, "grad_out");
  MAE_CHECK_FLOAT(grad_out_in, "grad_out");
  MAE_CHECK_DIM(ids_keep, 2, "ids_keep");
  MAE_CHECK_INDEX(ids_keep, "ids_keep");
  const int64_t P = patch_size;
  check_patch_size(P, height, width);
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const auto grad_out = grad_out_in.contiguous();
  const auto ids = as_long_indices(ids_keep);
  const int64_t B = grad_out.size(0), K = grad_out.size(1), N = grad_out.size(2);
  TORCH_CHECK(N % (P * P) == 0, "grad_out's last dimension ", N, " is not a multiple of patch_size**2");
  const int64_t C = N / (P * P), GW = width / P, L = (height / P) * GW;
  auto grad_imgs = at::empty({B, C, height, width}, grad_out.options());
  if (B * L == 0) return grad_imgs;
  const auto inv = invert_index(ids, L);
  MAE_DISPATCH_FLOATS(grad_out.scalar_type(), "gather_patches_cuda_backward", [&] {
    constexpr int V = vec_width<scalar_t>();
    const bool vectorized = P % V == 0 && width % V == 0;
    const dim3 grid(B * L), block(128);
    auto stream = current_stream();
    if (vectorized) {
      gather_patches_bwd_kernel<scalar_t, V><<<grid, block, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), inv.data_ptr<int32_t>(), grad_imgs.data_ptr<scalar_t>(), K, L, GW, C, P,
          height, width);
    } else {
      gather_patches_bwd_kernel<scalar_t, 1><<<grid, block, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), inv.data_ptr<int32_t>(), grad_imgs.data_ptr<scalar_t>(), K, L, GW, C, P,
          height, width);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_imgs;
}

}  // namespace mae_fast
