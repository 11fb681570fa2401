// masked_patch_loss: one warp per patch, values in registers, no shared memory and no block barriers.
//
// Forward: the warp of a masked patch reads its prediction row and its pixels straight from the image (patchified
// on the fly; uint8 pixels normalized as they are read), computes mean and unbiased variance in float32 with warp
// shuffles, and writes the patch's weighted loss: one float per patch. A visible patch's warp reads only its mask
// value. The per-patch losses are summed by at::sum: deterministic, no atomics.
//
// Backward recomputes the masked patches the same way and writes the prediction gradient once, in the prediction's
// dtype: diff * (2 * weight / N * grad_loss) in float32, rounded once. Rows of visible patches and the leading
// pred_offset rows (the decoder's cls token) are written as zeros without reads. When asked, each patch's warp also
// writes its pixels' gradient (zeros for visible patches), so the image gradient needs no zero fill.
//
// The patch geometry is a template parameter for the usual patch sizes (p = 16 and 14 with 3 channels: 24 and 19
// values per lane, all index arithmetic by constants); any other size runs the generic instance, which loops over
// the patch in global memory (L1-resident after the first pass) with 32-bit index arithmetic.
#include <vector>

#include "common.cuh"
#include "ops.h"

namespace mae_fast {

constexpr int kLossWarps = 8;  // warps (patches) per block
constexpr int64_t kMaxPatchValues = 1 << 16;

struct LossParams {
  const void* pred;
  const void* imgs;
  const float* norm;  // [2, C] mean and std of uint8 images
  const float* mask;
  const float* den;
  const float* grad_loss;
  float* loss;      // forward: [B * L] weighted per-patch losses
  void* grad_pred;  // backward: [B, T, N] contiguous
  void* grad_imgs;  // backward: [B, C, H, W] contiguous
  int64_t rows;     // forward: B * L patches; backward: B * T prediction rows
  int64_t T, off, L, GW, H, W;
  int P, C;
  float eps;
  int64_t spb, spl, spn, sb, sc, sh, sw, smb, sml;
  bool norm_pix, want_pred, want_imgs;
};

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffff, value, offset);
  return value;  // the same butterfly in every lane: every lane holds the same, deterministic sum
}

template <typename T>
__device__ __forceinline__ float pixel_as_float(const T* p, const float* norm, int c, int C) {
  if constexpr (std::is_same_v<T, uint8_t>) {
    return __fdiv_rn(static_cast<float>(*p) - norm[c], norm[C + c]);  // as normalizing first in float32
  } else {
    return static_cast<float>(*p);
  }
}

// P_, C_ > 0: the geometry is known at compile time and the patch lives in registers; 0: the generic loop.
template <typename TP, typename TI, int P_, int C_, bool BACKWARD>
__global__ void __launch_bounds__(kLossWarps * 32) masked_patch_loss_kernel(const LossParams a) {
  constexpr bool CACHED = P_ > 0 && C_ > 0;
  constexpr int VALS = CACHED ? (P_ * P_ * C_ + 31) / 32 : 1;
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x * (int64_t)kLossWarps + threadIdx.x / 32;  // warp-uniform
  if (row >= a.rows) return;
  const int P = CACHED ? P_ : a.P, C = CACHED ? C_ : a.C, N = P * P * C;
  int64_t b, l;
  bool is_patch = true;
  if (BACKWARD) {
    b = row / a.T;
    l = row % a.T - a.off;
    is_patch = l >= 0;
  } else {
    b = row / a.L;
    l = row % a.L;
  }
  float weight = 0.f;
  if (is_patch) {
    const float den = *a.den;
    weight = a.mask[b * a.smb + l * a.sml] / (den > 0.f ? den : 1.f);
  }
  const bool active = weight != 0.f;
  TP* grad_pred = static_cast<TP*>(a.grad_pred) + row * N;
  const int64_t h = is_patch ? l / a.GW : 0, w = is_patch ? l % a.GW : 0;
  const auto pixel_offset = [&](int n, int64_t sc, int64_t sh, int64_t sw) {
    const int i = n / (P * C), j = (n / C) % P, c = n % C;  // the official patchify order (channel fastest)
    return c * sc + i * sh + j * sw;
  };
  if (!active) {  // nothing to read: zero gradients (backward), zero loss (forward)
    if (BACKWARD) {
      if (a.want_pred)
        for (int n = lane; n < N; n += 32) grad_pred[n] = TP(0.f);
      if constexpr (!std::is_same_v<TI, uint8_t>) {
        if (a.want_imgs && is_patch) {
          TI* out = static_cast<TI*>(a.grad_imgs) + b * C * a.H * a.W + h * P * a.W + w * P;
          for (int n = lane; n < N; n += 32) out[pixel_offset(n, a.H * a.W, a.W, 1)] = TI(0.f);
        }
      }
    } else if (lane == 0) {
      a.loss[row] = 0.f;
    }
    return;
  }
  const TI* patch = static_cast<const TI*>(a.imgs) + b * a.sb + h * P * a.sh + w * P * a.sw;
  const TP* pred = static_cast<const TP*>(a.pred) + b * a.spb + (l + a.off) * a.spl;
  const auto target = [&](int n) { return pixel_as_float(patch + pixel_offset(n, a.sc, a.sh, a.sw), a.norm, n % C, C); };
  const auto prediction = [&](int n) { return static_cast<float>(pred[n * a.spn]); };

  // Cached: t and pred in registers (lane holds n = lane + 32 k). Generic: re-read on every pass.
  float t_reg[VALS], p_reg[VALS];
  const int passes = CACHED ? VALS : (N + 31) / 32;
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < (CACHED ? VALS : 1); ++k) t_reg[k] = p_reg[k] = 0.f;
  if constexpr (CACHED) {
#pragma unroll
    for (int k = 0; k < VALS; ++k) {
      const int n = lane + 32 * k;
      if (n < N) {
        t_reg[k] = target(n);
        p_reg[k] = prediction(n);
        sum += t_reg[k];
      }
    }
  } else {
    for (int n = lane; n < N; n += 32) sum += target(n);
  }
  const auto t_at = [&](int k, int n) {
    if constexpr (CACHED) return t_reg[k];
    else return target(n);
  };
  const auto p_at = [&](int k, int n) {
    if constexpr (CACHED) return p_reg[k];
    else return prediction(n);
  };
  float mean = 0.f, rstd = 1.f;
  if (a.norm_pix) {
    mean = warp_sum(sum) / N;
    float sq = 0.f;
#pragma unroll
    for (int k = 0; k < passes; ++k) {
      const int n = lane + 32 * k;
      if (n < N) {
        const float centered = t_at(k, n) - mean;
        sq += centered * centered;
      }
    }
    rstd = 1.f / sqrtf(warp_sum(sq) / (N - 1) + a.eps);
  }
  // The normalized target of element (k, n).
  const auto norm_t = [&](int k, int n) { return a.norm_pix ? (t_at(k, n) - mean) * rstd : t_at(k, n); };

  if (!BACKWARD) {
    float err = 0.f;
#pragma unroll
    for (int k = 0; k < passes; ++k) {
      const int n = lane + 32 * k;
      if (n < N) {
        const float diff = p_at(k, n) - norm_t(k, n);
        err += diff * diff;
      }
    }
    const float patch_loss = warp_sum(err) / N;
    if (lane == 0) a.loss[row] = patch_loss * weight;
    return;
  }

  const float scale = 2.f * weight / N * *a.grad_loss;  // d loss / d pred = diff * scale; d / d target = -that
  float g_sum = 0.f, g_dot = 0.f;
#pragma unroll
  for (int k = 0; k < passes; ++k) {
    const int n = lane + 32 * k;
    if (n < N) {
      const float t = norm_t(k, n), g = (p_at(k, n) - t) * scale;
      if (a.want_pred) grad_pred[n] = static_cast<TP>(g);
      g_sum -= g;
      g_dot -= g * t;
    }
  }
  if constexpr (!std::is_same_v<TI, uint8_t>) {
    if (a.want_imgs) {
      float g_mean = 0.f, g_proj = 0.f;
      if (a.norm_pix) {  // t = (x - mean) * rstd: dx = rstd * (g_t - mean(g_t) - t * sum(g_t * t) / (N - 1))
        g_mean = warp_sum(g_sum) / N;
        g_proj = warp_sum(g_dot) / (N - 1);
      }
      TI* out = static_cast<TI*>(a.grad_imgs) + b * C * a.H * a.W + h * P * a.W + w * P;
#pragma unroll
      for (int k = 0; k < passes; ++k) {
        const int n = lane + 32 * k;
        if (n < N) {
          const float t = norm_t(k, n), g_t = -(p_at(k, n) - t) * scale;
          const float dx = a.norm_pix ? rstd * (g_t - g_mean - t * g_proj) : g_t;
          out[pixel_offset(n, a.H * a.W, a.W, 1)] = static_cast<TI>(dx);
        }
      }
    }
  }
}

template <typename TP, typename TI, bool BACKWARD>
static void launch_loss(const LossParams& params) {
  const dim3 grid(static_cast<unsigned>((params.rows + kLossWarps - 1) / kLossWarps)), block(kLossWarps * 32);
  auto stream = current_stream();
  if (params.C == 3 && params.P == 16) {
    masked_patch_loss_kernel<TP, TI, 16, 3, BACKWARD><<<grid, block, 0, stream>>>(params);
  } else if (params.C == 3 && params.P == 14) {
    masked_patch_loss_kernel<TP, TI, 14, 3, BACKWARD><<<grid, block, 0, stream>>>(params);
  } else {
    masked_patch_loss_kernel<TP, TI, 0, 0, BACKWARD><<<grid, block, 0, stream>>>(params);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Checks shared by forward and backward; returns the parameters with shapes and strides filled in.
static LossParams loss_params(const at::Tensor& pred, const at::Tensor& imgs, const std::optional<at::Tensor>& norm,
                              const at::Tensor& mask, int64_t patch_size, int64_t pred_offset, bool norm_pix,
                              double eps) {
  MAE_CHECK_CUDA(pred, "pred");
  MAE_CHECK_DIM(pred, 3, "pred");
  MAE_CHECK_FLOAT(pred, "pred");
  MAE_CHECK_DIM(imgs, 4, "imgs");
  TORCH_CHECK(imgs.scalar_type() != at::kByte || norm.has_value(), "uint8 imgs need norm (their mean and std)");
  TORCH_CHECK(imgs.scalar_type() == at::kByte || imgs.scalar_type() == at::kFloat || imgs.scalar_type() == at::kHalf ||
                  imgs.scalar_type() == at::kBFloat16,
              "imgs must be float32, float16, bfloat16 or uint8, got ", imgs.scalar_type());
  MAE_CHECK_DIM(mask, 2, "mask");
  TORCH_CHECK(mask.scalar_type() == at::kFloat, "mask must be float32, got ", mask.scalar_type());
  MAE_CHECK_SAME_DEVICE(pred, imgs, "pred", "imgs");
  MAE_CHECK_SAME_DEVICE(pred, mask, "pred", "mask");
  const int64_t B = imgs.size(0), C = imgs.size(1), H = imgs.size(2), W = imgs.size(3), P = patch_size;
  TORCH_CHECK(P > 0 && H % P == 0 && W % P == 0, "patch_size=", P, " does not divide the imgs size ", H, "x", W);
  TORCH_CHECK(pred_offset >= 0, "pred_offset must be >= 0, got ", pred_offset);
  const int64_t GW = W / P, L = (H / P) * GW, N = C * P * P;
  TORCH_CHECK(pred.size(0) == B && pred.size(1) == L + pred_offset && pred.size(2) == N, "pred must have shape [", B,
              ", ", L + pred_offset, ", ", N, "], got ", pred.sizes());
  TORCH_CHECK(mask.size(0) == B && mask.size(1) == L, "mask must have shape [", B, ", ", L, "], got ", mask.sizes());
  TORCH_CHECK(N <= kMaxPatchValues, "the CUDA masked_patch_loss handles patches of at most ", kMaxPatchValues,
              " values (p*p*C), got ", N, "; use backend='triton' or 'torch'");
  TORCH_CHECK(!norm_pix || N >= 2, "norm_pix needs at least 2 values per patch, got ", N);
  if (norm) {
    MAE_CHECK_SAME_DEVICE(pred, *norm, "pred", "norm");
    TORCH_CHECK(norm->scalar_type() == at::kFloat && norm->is_contiguous() && norm->numel() == 2 * C,
                "norm must be a contiguous float32 [2, ", C, "] tensor, got ", norm->sizes());
  }
  LossParams p{};
  p.T = L + pred_offset;
  p.off = pred_offset;
  p.L = L;
  p.GW = GW;
  p.H = H;
  p.W = W;
  p.P = static_cast<int>(P);
  p.C = static_cast<int>(C);
  p.eps = static_cast<float>(eps);
  p.spb = pred.stride(0);
  p.spl = pred.stride(1);
  p.spn = pred.stride(2);
  p.sb = imgs.stride(0);
  p.sc = imgs.stride(1);
  p.sh = imgs.stride(2);
  p.sw = imgs.stride(3);
  p.smb = mask.stride(0);
  p.sml = mask.stride(1);
  p.norm_pix = norm_pix;
  p.pred = pred.data_ptr();
  p.imgs = imgs.data_ptr();
  p.norm = norm ? norm->data_ptr<float>() : nullptr;
  p.mask = mask.data_ptr<float>();
  return p;
}

at::Tensor masked_patch_loss_cuda(const at::Tensor& pred, const at::Tensor& imgs, const std::optional<at::Tensor>& norm,
                                  const at::Tensor& mask, int64_t patch_size, int64_t pred_offset, bool norm_pix,
                                  double eps) {
  LossParams params = loss_params(pred, imgs, norm, mask, patch_size, pred_offset, norm_pix, eps);
  const c10::cuda::CUDAGuard guard(pred.device());  // after the checks: pred is known to be a CUDA tensor
  const auto den = mask.sum(at::kFloat);
  auto per_patch = at::empty({imgs.size(0) * params.L}, pred.options().dtype(at::kFloat));
  params.rows = per_patch.numel();
  params.den = den.data_ptr<float>();
  params.loss = per_patch.data_ptr<float>();
  if (params.rows > 0) {
    MAE_DISPATCH_FLOATS(pred.scalar_type(), "masked_patch_loss_cuda", [&] {
      using TP = scalar_t;
      MAE_DISPATCH_IMAGES(imgs.scalar_type(), "masked_patch_loss_cuda_imgs", [&] {
        launch_loss<TP, scalar_t, false>(params);
      });
    });
  }
  return per_patch.sum();
}

std::tuple<at::Tensor, at::Tensor> masked_patch_loss_cuda_backward(
    const at::Tensor& pred, const at::Tensor& imgs, const std::optional<at::Tensor>& norm, const at::Tensor& mask,
    const at::Tensor& grad_loss, int64_t patch_size, int64_t pred_offset, bool norm_pix, double eps, bool grad_pred,
    bool grad_imgs) {
  LossParams params = loss_params(pred, imgs, norm, mask, patch_size, pred_offset, norm_pix, eps);
  const c10::cuda::CUDAGuard guard(pred.device());  // after the checks: pred is known to be a CUDA tensor
  TORCH_CHECK(!grad_imgs || imgs.scalar_type() != at::kByte, "uint8 imgs have no gradient");
  const auto den = mask.sum(at::kFloat);
  const auto scale = grad_loss.to(at::kFloat).reshape({1}).contiguous();
  auto gpred = at::empty(grad_pred ? pred.sizes() : at::IntArrayRef({0}), pred.options());
  auto gimgs = at::empty(grad_imgs ? imgs.sizes() : at::IntArrayRef({0}), imgs.options());
  params.rows = pred.size(0) * params.T;
  params.den = den.data_ptr<float>();
  params.grad_loss = scale.data_ptr<float>();
  params.grad_pred = grad_pred ? gpred.data_ptr() : nullptr;
  params.grad_imgs = grad_imgs ? gimgs.data_ptr() : nullptr;
  params.want_pred = grad_pred;
  params.want_imgs = grad_imgs;
  if (params.rows > 0 && (grad_pred || grad_imgs)) {
    MAE_DISPATCH_FLOATS(pred.scalar_type(), "masked_patch_loss_cuda_backward", [&] {
      using TP = scalar_t;
      MAE_DISPATCH_IMAGES(imgs.scalar_type(), "masked_patch_loss_cuda_backward_imgs", [&] {
        launch_loss<TP, scalar_t, true>(params);
      });
    });
  }
  return {gpred, gimgs};
}

}  // namespace mae_fast
