// Host functions of the mae_fast CUDA ops (registered in ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace mae_fast {

at::Tensor invert_index(const at::Tensor& ids, int64_t length);

// Whether the CUDA kernels may read t's rows in vectors of `vec` elements (common.cuh); for tests, on any device.
bool vectorizable_rows(const at::Tensor& t, int64_t vec);

at::Tensor gather_patches_cuda(const at::Tensor& imgs, const at::Tensor& ids_keep, int64_t patch_size,
                               const std::optional<at::Tensor>& norm, at::ScalarType out_dtype);
at::Tensor gather_patches_cuda_backward(const at::Tensor& grad_out, const at::Tensor& ids_keep, int64_t patch_size,
                                        int64_t height, int64_t width, at::ScalarType imgs_dtype);

at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& ids_keep, const std::optional<at::Tensor>& pos);
at::Tensor gather_tokens_cuda_backward(const at::Tensor& grad_out, const at::Tensor& ids_keep, int64_t length);

at::Tensor restore_tokens_cuda(const at::Tensor& x_visible, const at::Tensor& ids_restore, const at::Tensor& mask_token,
                               const std::optional<at::Tensor>& pos, std::optional<at::ScalarType> out_dtype);
std::tuple<at::Tensor, at::Tensor> restore_tokens_cuda_backward(const at::Tensor& grad_out,
                                                                const at::Tensor& ids_restore, int64_t num_visible,
                                                                at::ScalarType x_dtype);

at::Tensor masked_patch_loss_cuda(const at::Tensor& pred, const at::Tensor& imgs, const std::optional<at::Tensor>& norm,
                                  const at::Tensor& mask, int64_t patch_size, int64_t pred_offset, bool norm_pix,
                                  double eps);
std::tuple<at::Tensor, at::Tensor> masked_patch_loss_cuda_backward(
    const at::Tensor& pred, const at::Tensor& imgs, const std::optional<at::Tensor>& norm, const at::Tensor& mask,
    const at::Tensor& grad_loss, int64_t patch_size, int64_t pred_offset, bool norm_pix, double eps, bool grad_pred,
    bool grad_imgs);

}  // namespace mae_fast
