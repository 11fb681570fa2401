// The CUDA kernels of mae_fast's ops. Their schemas, fake (meta) implementations and autograd are defined in Python
// when mae_fast.ops is imported (mae_fast/ops/<op>.py, through dispatch.define_cuda_op), so they exist before and
// without this extension; loading it adds the CUDA kernels below.
#include <torch/library.h>

#include "ops.h"

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

// The kernels' vector-access decision, on tensors of any device, so tests can check it without a GPU.
TORCH_LIBRARY_IMPL(mae_fast, CompositeExplicitAutograd, m) { m.impl("vectorizable_rows", &mae_fast::vectorizable_rows); }

// Importing mae_fast._C runs the registrations above; the module itself holds nothing.
#include <Python.h>
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mae_fast CUDA ops (see torch.ops.mae_fast)", -1,
                                        nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
