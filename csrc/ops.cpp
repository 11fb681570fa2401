// The one registration of mae_fast's CUDA ops: schemas here, CUDA kernels from the .cu files.
// Fake (meta) implementations and autograd are registered from Python (mae_fast/ops/<op>.py).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(mae_fast, m) {
  m.def("gather_patches_cuda(Tensor imgs, Tensor ids_keep, int patch_size) -> Tensor");
  m.def("gather_patches_cuda_backward(Tensor grad_out, Tensor ids_keep, int patch_size, int height, int width) -> Tensor");
  m.def("gather_tokens_cuda(Tensor x, Tensor ids_keep, Tensor? pos_embed) -> Tensor");
  m.def("gather_tokens_cuda_backward(Tensor grad_out, Tensor ids_keep, int length) -> Tensor");
  m.def("restore_tokens_cuda(Tensor x_visible, Tensor ids_restore, Tensor mask_token, Tensor? pos_embed, "
        "ScalarType? out_dtype=None) -> Tensor");
  m.def("restore_tokens_cuda_backward(Tensor grad_out, Tensor ids_restore, int num_visible, ScalarType x_dtype) "
        "-> (Tensor, Tensor)");
  m.def("masked_patch_loss_cuda(Tensor pred, Tensor imgs, Tensor mask, int patch_size, bool norm_pix, float eps, "
        "bool grad_pred, bool grad_imgs) -> (Tensor, Tensor, Tensor)");
  m.def("masked_patch_loss_cuda_backward(Tensor saved_grad_pred, Tensor mask, Tensor grad_loss, ScalarType pred_dtype) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(mae_fast, CUDA, m) {
  m.impl("gather_patches_cuda", &mae_fast::gather_patches_cuda);
  m.impl("gather_patches_cuda_backward", &mae_fast::gather_patches_cuda_backward);
  m.impl("gather_tokens_cuda", &mae_fast::gather_tokens_cuda);
  m.impl("gather_tokens_cuda_backward", &mae_fast::gather_tokens_cuda_backward);
  m.impl("restore_tokens_cuda", &mae_fast::restore_tokens_cuda);
  m.impl("restore_tokens_cuda_backward", &mae_fast::restore_tokens_cuda_backward);
  m.impl("masked_patch_loss_cuda", &mae_fast::masked_patch_loss_cuda);
  m.impl("masked_patch_loss_cuda_backward", &mae_fast::masked_patch_loss_cuda_backward);
}

// Importing mae_fast._C runs the registrations above; the module itself holds nothing.
#include <Python.h>
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mae_fast CUDA ops (see torch.ops.mae_fast)", -1,
                                        nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
