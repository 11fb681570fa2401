"""The CUDA extension mae_fast._C: built wherever it can be, registers every op once, fakes match the schemas.

Numerics of the CUDA kernels are checked with the other backends in tests/ops/test_<op>.py on a GPU.
"""

import shutil

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mae_fast.ops import (
    BackendUnavailableError,
    IMPLEMENTATIONS,
    dispatch,
    gather_patches,
    gather_tokens,
    masked_patch_loss,
    restore_tokens,
    sample_mask,
)

CUDA_OPS = ["gather_patches_cuda", "gather_patches_cuda_backward", "gather_tokens_cuda", "gather_tokens_cuda_backward",
            "restore_tokens_cuda", "restore_tokens_cuda_backward", "masked_patch_loss_cuda",
            "masked_patch_loss_cuda_backward"]
BUILDABLE = torch.version.cuda is not None and shutil.which("nvcc") is not None

needs_extension = pytest.mark.skipif(not dispatch.cuda_extension_loaded(),
                                     reason="mae_fast._C is not built here (no nvcc or a CPU-only torch)")


def test_the_extension_is_built_where_it_can_be():
    if not BUILDABLE:
        pytest.skip("no nvcc or a CPU-only torch: the package installs without the extension")
    assert dispatch.cuda_extension_loaded(), dispatch._cuda_extension_error()


@needs_extension
def test_every_op_is_registered_once_with_a_cuda_kernel():
    for name in CUDA_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mae_fast::{name}", "CUDA"), name
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"mae_fast::{name}", "CPU"), name
    assert all("cuda" in impls for impls in IMPLEMENTATIONS.values())


@needs_extension
def test_fake_implementations_give_the_kernel_shapes():
    with FakeTensorMode():
        imgs = torch.empty(2, 3, 24, 40, device="cuda")
        ids_keep = torch.empty(2, 6, dtype=torch.long, device="cuda")
        ids_restore = torch.empty(2, 15, dtype=torch.long, device="cuda")
        assert torch.ops.mae_fast.gather_patches_cuda(imgs, ids_keep, 8).shape == (2, 6, 192)
        assert torch.ops.mae_fast.gather_patches_cuda_backward(torch.empty(2, 6, 192, device="cuda"), ids_keep, 8, 24,
                                                               40).shape == (2, 3, 24, 40)
        x = torch.empty(2, 15, 20, device="cuda", dtype=torch.bfloat16)
        assert torch.ops.mae_fast.gather_tokens_cuda(x, ids_keep, None).shape == (2, 6, 20)
        restored = torch.ops.mae_fast.restore_tokens_cuda(x[:, :6], ids_restore, torch.empty(20, device="cuda"), None,
                                                         torch.float32)
        assert restored.shape == (2, 15, 20) and restored.dtype == torch.float32
        grad_x, grad_token = torch.ops.mae_fast.restore_tokens_cuda_backward(restored, ids_restore, 6, torch.bfloat16)
        assert grad_x.shape == (2, 6, 20) and grad_x.dtype == torch.bfloat16 and grad_token.shape == (20,)
        loss, saved, gimgs = torch.ops.mae_fast.masked_patch_loss_cuda(
            torch.empty(2, 15, 192, device="cuda"), imgs, torch.empty(2, 15, device="cuda"), 8, True, 1e-6, True, True)
        assert loss.shape == () and saved.shape == (2, 15, 192) and gimgs.shape == (2, 3, 24, 40)


def test_explicit_cuda_backend_says_why_it_cannot_run_here():
    if torch.cuda.is_available() and dispatch.cuda_extension_loaded():
        pytest.skip("the CUDA backend runs here")
    imgs, ids = torch.randn(2, 3, 8, 8), torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(BackendUnavailableError, match="backend='cuda' cannot run: (it needs CUDA tensors|the CUDA "
                                                      "extension mae_fast._C is not built)"):
        gather_patches(imgs, ids, 4, backend="cuda")


@pytest.mark.gpu
@needs_extension
def test_cuda_and_triton_agree_on_every_op():
    torch.manual_seed(0)
    dev = "cuda"
    ids_keep, ids_restore, mask = sample_mask(4, 196, 0.75, device=dev)
    imgs = torch.randn(4, 3, 224, 224, device=dev)
    x = torch.randn(4, 196, 768, device=dev, dtype=torch.bfloat16)
    pos = torch.randn(196, 768, device=dev)
    pred = torch.randn(4, 196, 768, device=dev, dtype=torch.bfloat16)
    token = torch.randn(768, device=dev)
    cases = [
        lambda b: gather_patches(imgs, ids_keep, 16, backend=b),
        lambda b: gather_tokens(x, ids_keep, pos, backend=b),
        lambda b: restore_tokens(x[:, :49], ids_restore, token, pos, backend=b, out_dtype=torch.float32),
        lambda b: masked_patch_loss(pred, imgs, mask, 16, backend=b),
    ]
    for case in cases:
        torch.testing.assert_close(case("cuda"), case("triton"), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_extension
def test_cuda_masked_patch_loss_size_limit_falls_back_under_auto():
    imgs = torch.randn(1, 3, 64, 64, device="cuda")  # p=64: 12288 values per patch
    pred = torch.randn(1, 1, 3 * 64 * 64, device="cuda")
    mask = torch.ones(1, 1, device="cuda")
    ref = masked_patch_loss(pred, imgs, mask, 64, backend="torch")
    torch.testing.assert_close(masked_patch_loss(pred, imgs, mask, 64), ref)
    with pytest.raises(BackendUnavailableError, match="at most 5120 values per patch"):
        masked_patch_loss(pred, imgs, mask, 64, backend="cuda")
