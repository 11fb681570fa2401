// masked_patch_loss: one block per patch. A masked patch's block reads its prediction row and its pixels straight
// from the image (patchified on the fly; runs of pixels along an image row move as vectors where the layout allows), computes mean and unbiased variance in float32, the weighted loss and
// the gradients for an incoming gradient of 1; a visible patch's block reads only its mask value (and writes zero
// gradient rows). Block sums are reduced in a fixed order and the per-patch losses are summed by at::sum:
// deterministic, no atomics. Backward scales the saved float32 gradient by the incoming one.
#include <vector>

#include "common.cuh"
#include "ops.h"

namespace mae_fast {

constexpr int kLossThreads = 256;
constexpr int64_t kMaxPatchValues = 5120;  // p*p*C the block stages in shared memory (2 x 20 KiB)

// Which accesses may use vectors (decided by the host from shapes, strides and alignment; see masked_patch_loss_cuda).
struct LossVectors {
  bool pred;   // the prediction row: vec_width<TP> elements per access
  bool imgs;   // a patch row of p pixels: vec_width<TI> per access
  bool saved;  // the float32 gradient rows: 4 per access
  bool gimgs;  // the float32 image gradient: 4 pixels per access
};

template <typename TP, typename TI>
__global__ void masked_patch_loss_fwd_kernel(const TP* __restrict__ pred, const TI* __restrict__ imgs,
                                             const float* __restrict__ mask, const float* __restrict__ den_ptr,
                                             float* __restrict__ loss, float* __restrict__ grad_pred,
                                             float* __restrict__ grad_imgs, int64_t L, int64_t GW, int64_t C,
                                             int64_t P, int64_t H, int64_t W, float eps, int64_t spb, int64_t spl,
                                             int64_t spn, int64_t sb, int64_t sc, int64_t sh, int64_t sw, int64_t smb,
                                             int64_t sml, bool norm_pix, bool want_grad_pred, bool want_grad_imgs,
                                             LossVectors vec) {
  constexpr int PV = vec_width<TP>(), IV = vec_width<TI>();
  extern __shared__ float staged[];  // t[N] then pred[N]
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x, b = row / L, l = row % L, N = C * P * P;
  const float den = *den_ptr;
  const float weight = mask[b * smb + l * sml] / (den > 0.f ? den : 1.f);
  const int64_t h = l / GW, w = l % GW;
  if (weight == 0.f) {  // a visible patch: nothing to read; its saved gradient row is zeros
    if (threadIdx.x == 0) loss[row] = 0.f;
    if (want_grad_pred) {
      if (vec.saved) {
        const float zeros[4] = {0.f, 0.f, 0.f, 0.f};
        for (int64_t q = threadIdx.x; q < N / 4; q += blockDim.x) store_from_float<float, 4>(grad_pred + row * N + q * 4, zeros);
      } else {
        for (int64_t n = threadIdx.x; n < N; n += blockDim.x) grad_pred[row * N + n] = 0.f;
      }
    }
    return;
  }
  float* t = staged;
  float* p = staged + N;
  if (vec.pred) {
    for (int64_t q = threadIdx.x; q < N / PV; q += blockDim.x) load_as_float<TP, PV>(pred + b * spb + l * spl + q * PV, p + q * PV);
  } else {
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) p[n] = static_cast<float>(pred[b * spb + l * spl + n * spn]);
  }
  // The official patchify order: row i, column j, channel c (channel fastest): t[(i * P + j) * C + c].
  const TI* patch = imgs + b * sb + (h * P) * sh + (w * P) * sw;
  float sum = 0.f;
  if (vec.imgs) {  // IV pixels of one image row and channel per access
    const int64_t per_row = P / IV;
    for (int64_t q = threadIdx.x; q < C * P * per_row; q += blockDim.x) {
      const int64_t c = q / (P * per_row), i = (q / per_row) % P, j0 = (q % per_row) * IV;
      float value[IV];
      load_as_float<TI, IV>(patch + c * sc + i * sh + j0, value);
#pragma unroll
      for (int e = 0; e < IV; ++e) {
        t[(i * P + j0 + e) * C + c] = value[e];
        sum += value[e];
      }
    }
  } else {
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
      const int64_t i = n / (P * C), j = (n / C) % P, c = n % C;
      const float value = static_cast<float>(patch[c * sc + i * sh + j * sw]);
      t[n] = value;
      sum += value;
    }
  }
  __syncthreads();  // p and t are read below by other threads than those that staged them
  float rstd = 1.f;
  if (norm_pix) {
    const float mean = block_sum(sum, scratch) / N;
    float sq = 0.f;
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
      const float centered = t[n] - mean;
      t[n] = centered;
      sq += centered * centered;
    }
    rstd = rsqrtf(block_sum(sq, scratch) / (N - 1) + eps);
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) t[n] *= rstd;
  }
  float err = 0.f;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    const float diff = p[n] - t[n];
    err += diff * diff;
    p[n] = diff * (2.f * weight / N);  // the prediction's gradient; the target's is its negative
  }
  const float patch_loss = block_sum(err, scratch) / N;  // its barrier also publishes p and t to every thread
  if (threadIdx.x == 0) loss[row] = patch_loss * weight;
  if (want_grad_pred) {
    if (vec.saved) {
      for (int64_t q = threadIdx.x; q < N / 4; q += blockDim.x) store_from_float<float, 4>(grad_pred + row * N + q * 4, p + q * 4);
    } else {
      for (int64_t n = threadIdx.x; n < N; n += blockDim.x) grad_pred[row * N + n] = p[n];
    }
  }
  if (want_grad_imgs) {
    float g_mean = 0.f, g_dot = 0.f;
    if (norm_pix) {  // t = (x - mean) * rstd: dx = rstd * (g - mean(g) - t * sum(g * t) / (N - 1)), g = -p
      float gs = 0.f, gd = 0.f;
      for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
        gs += -p[n];
        gd += -p[n] * t[n];
      }
      g_mean = block_sum(gs, scratch) / N;
      g_dot = block_sum(gd, scratch) / (N - 1);
    }
    float* out = grad_imgs + ((b * C) * H + h * P) * W + w * P;  // the patch's top-left pixel, channel 0
    const auto dx = [&](int64_t n) {
      const float g = -p[n];
      return norm_pix ? rstd * (g - g_mean - t[n] * g_dot) : g;
    };
    if (vec.gimgs) {  // 4 pixels of one image row and channel per access
      const int64_t per_row = P / 4;
      for (int64_t q = threadIdx.x; q < C * P * per_row; q += blockDim.x) {
        const int64_t c = q / (P * per_row), i = (q / per_row) % P, j0 = (q % per_row) * 4;
        float value[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) value[e] = dx((i * P + j0 + e) * C + c);
        store_from_float<float, 4>(out + (c * H + i) * W + j0, value);
      }
    } else {
      for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
        const int64_t i = n / (P * C), j = (n / C) % P, c = n % C;
        out[(c * H + i) * W + j] = dx(n);
      }
    }
  }
}

// VEC > 1: N % VEC == 0 and a 16-byte aligned saved gradient (grad_pred is a fresh allocation).
template <typename TP, int VEC>
__global__ void masked_patch_loss_bwd_kernel(const float* __restrict__ saved, const float* __restrict__ mask,
                                             const float* __restrict__ grad_loss, TP* __restrict__ grad_pred,
                                             int64_t rows, int64_t L, int64_t N, int64_t smb, int64_t sml) {
  const float scale = *grad_loss;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const bool active = mask[(row / L) * smb + (row % L) * sml] != 0.f;
    for (int64_t q = threadIdx.x; q < N / VEC; q += blockDim.x) {
      float value[VEC];
      if (active) {  // a visible patch's row is not read: its gradient is zero
        load_as_float<float, VEC>(saved + row * N + q * VEC, value);
#pragma unroll
        for (int e = 0; e < VEC; ++e) value[e] *= scale;
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) value[e] = 0.f;
      }
      store_from_float<TP, VEC>(grad_pred + row * N + q * VEC, value);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_patch_loss_cuda(const at::Tensor& pred, const at::Tensor& imgs,
                                                                      const at::Tensor& mask_in, int64_t patch_size,
                                                                      bool norm_pix, double eps, bool grad_pred,
                                                                      bool grad_imgs) {
  MAE_CHECK_CUDA(pred, "pred");
  MAE_CHECK_DIM(pred, 3, "pred");
  MAE_CHECK_FLOAT(pred, "pred");
  MAE_CHECK_DIM(imgs, 4, "imgs");
  MAE_CHECK_FLOAT(imgs, "imgs");
  MAE_CHECK_DIM(mask_in, 2, "mask");
  MAE_CHECK_SAME_DEVICE(pred, imgs, "pred", "imgs");
  MAE_CHECK_SAME_DEVICE(pred, mask_in, "pred", "mask");
  const int64_t B = imgs.size(0), C = imgs.size(1), H = imgs.size(2), W = imgs.size(3), P = patch_size;
  TORCH_CHECK(P > 0 && H % P == 0 && W % P == 0, "patch_size=", P, " does not divide the imgs size ", H, "x", W);
  const int64_t GW = W / P, L = (H / P) * GW, N = C * P * P;
  TORCH_CHECK(pred.size(0) == B && pred.size(1) == L && pred.size(2) == N, "pred must have shape [", B, ", ", L, ", ",
              N, "], got ", pred.sizes());
  TORCH_CHECK(mask_in.size(0) == B && mask_in.size(1) == L, "mask must have shape [", B, ", ", L, "], got ",
              mask_in.sizes());
  TORCH_CHECK(N <= kMaxPatchValues, "the CUDA masked_patch_loss handles patches of at most ", kMaxPatchValues,
              " values (p*p*C), got ", N, "; use backend='triton' or 'torch'");
  TORCH_CHECK(!norm_pix || N >= 2, "norm_pix needs at least 2 values per patch, got ", N);
  const c10::cuda::CUDAGuard guard(pred.device());
  const auto mask = mask_in.to(at::kFloat);
  const auto den = mask.sum();
  auto per_patch = at::empty({B * L}, pred.options().dtype(at::kFloat));
  const std::vector<int64_t> saved_shape = grad_pred ? std::vector<int64_t>{B, L, N} : std::vector<int64_t>{0};
  auto saved = at::empty(saved_shape, per_patch.options());
  auto gimgs = grad_imgs ? at::zeros({B, C, H, W}, per_patch.options()) : at::empty({0}, per_patch.options());
  if (B * L > 0) {
    const size_t shared = 2 * N * sizeof(float);
    auto stream = current_stream();
    MAE_DISPATCH_FLOATS(pred.scalar_type(), "masked_patch_loss_cuda", [&] {
      using TP = scalar_t;
      MAE_DISPATCH_FLOATS(imgs.scalar_type(), "masked_patch_loss_cuda_imgs", [&] {
        using TI = scalar_t;
        constexpr int PV = vec_width<TP>(), IV = vec_width<TI>();
        LossVectors vec;
        vec.pred = pred.stride(2) == 1 && N % PV == 0 && pred.stride(1) % PV == 0 && pred.stride(0) % PV == 0 &&
                   aligned16(pred.data_ptr());
        vec.imgs = imgs.stride(3) == 1 && P % IV == 0 && imgs.stride(2) % IV == 0 && imgs.stride(1) % IV == 0 &&
                   imgs.stride(0) % IV == 0 && aligned16(imgs.data_ptr());
        vec.saved = N % 4 == 0;             // a fresh [B, L, N] float32 buffer
        vec.gimgs = P % 4 == 0 && W % 4 == 0;  // a fresh [B, C, H, W] float32 buffer
        masked_patch_loss_fwd_kernel<TP, TI><<<B * L, kLossThreads, shared, stream>>>(
            pred.data_ptr<TP>(), imgs.data_ptr<TI>(), mask.data_ptr<float>(), den.data_ptr<float>(),
            per_patch.data_ptr<float>(), grad_pred ? saved.data_ptr<float>() : nullptr,
            grad_imgs ? gimgs.data_ptr<float>() : nullptr, L, GW, C, P, H, W, static_cast<float>(eps), pred.stride(0),
            pred.stride(1), pred.stride(2), imgs.stride(0), imgs.stride(1), imgs.stride(2), imgs.stride(3),
            mask.stride(0), mask.stride(1), norm_pix, grad_pred, grad_imgs, vec);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {per_patch.sum(), saved, gimgs};
}

at::Tensor masked_patch_loss_cuda_backward(const at::Tensor& saved, const at::Tensor& mask_in,
                                           const at::Tensor& grad_loss, at::ScalarType pred_dtype) {
  MAE_CHECK_CUDA(saved, "saved_grad_pred");
  MAE_CHECK_DIM(saved, 3, "saved_grad_pred");
  TORCH_CHECK(saved.scalar_type() == at::kFloat, "saved_grad_pred must be float32, got ", saved.scalar_type());
  MAE_CHECK_DIM(mask_in, 2, "mask");
  const c10::cuda::CUDAGuard guard(saved.device());
  const auto mask = mask_in.to(at::kFloat);
  const auto scale = grad_loss.to(at::kFloat).reshape({1}).contiguous();
  const auto saved_c = saved.contiguous();
  const int64_t B = saved.size(0), L = saved.size(1), N = saved.size(2);
  auto grad_pred = at::empty({B, L, N}, saved.options().dtype(pred_dtype));
  if (B * L * N == 0) return grad_pred;
  MAE_DISPATCH_FLOATS(pred_dtype, "masked_patch_loss_cuda_backward", [&] {
    using TP = scalar_t;
    constexpr int V = vec_width<TP>() > 4 ? vec_width<TP>() : 4;  // 16-byte stores of grad_pred
    const bool vectorized = N % V == 0 && aligned16(saved_c.data_ptr());
    const dim3 grid(num_blocks(B * L, 1, 65535)), block(256);
    const auto launch = [&](auto kernel) {
      kernel<<<grid, block, 0, current_stream()>>>(saved_c.data_ptr<float>(), mask.data_ptr<float>(),
                                                   scale.data_ptr<float>(), grad_pred.data_ptr<TP>(), B * L, L, N,
                                                   mask.stride(0), mask.stride(1));
    };
    if (vectorized) launch(masked_patch_loss_bwd_kernel<TP, V>);
    else launch(masked_patch_loss_bwd_kernel<TP, 1>);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_pred;
}

}  // namespace mae_fast
