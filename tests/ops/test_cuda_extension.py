"""The CUDA extension mae_fast._C: built wherever it can be, registers every op once, fakes match the schemas.

Numerics of the CUDA kernels are checked with the other backends in tests/ops/test_<op>.py on a GPU.
"""

import runpy
import shutil
import sys
from pathlib import Path

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

needs_extension = pytest.mark.skipif(
    not dispatch.cuda_extension_loaded(),
    reason=f"mae_fast._C is not built here ({dispatch.cuda_build_skipped() or 'no nvcc or a CPU-only torch'})")


def extension_verdict(buildable: bool, loaded: bool, note: str | None, gpu_visible: bool) -> tuple[str, str]:
    """What the test below concludes, ``("pass" | "skip" | "fail", why)``, from whether this machine could build
    mae_fast._C (nvcc and a CUDA torch), whether it loads, setup.py's note (:func:`dispatch.cuda_build_skipped`)
    and whether a GPU is visible now."""
    if loaded:
        return "pass", "mae_fast._C loads"
    if not buildable:
        return "skip", "no nvcc or a CPU-only torch: the package installs without the extension"
    if note is None:  # setup.py leaves a note for every skip it chose: the build failed, or never ran
        return "fail", f"the build failed or did not run: {dispatch._cuda_extension_error()}"
    if note.startswith(dispatch.NO_GPU_NOTE) and gpu_visible:
        return "fail", f"{note}, but one is visible now: install again here, or with MAE_FAST_FORCE_CUDA_BUILD=1"
    return "skip", f"the install skipped the build: {note}"


def test_the_extension_is_built_where_it_can_be():
    loaded = dispatch.cuda_extension_loaded()
    gpu_visible = BUILDABLE and not loaded and torch.cuda.is_available()
    verdict, why = extension_verdict(BUILDABLE, loaded, dispatch.cuda_build_skipped(), gpu_visible)
    if verdict == "skip":
        pytest.skip(why)
    assert verdict == "pass", why


ROOT = Path(__file__).resolve().parents[2]


def run_setup(tmp_path: Path, monkeypatch, gpu_visible: bool, cuda_torch: bool = True, **env: str) -> dict:
    """Run setup.py as pip runs it (setup() itself left out) with the variables ``env``, on a copy whose package
    keeps its own note (the checkout's stays as it is), with a CUDA source and a toolkit folder holding nvcc and
    libcudart, under a CUDA torch (or a CPU-only one) that sees a GPU or not. Returns setup()'s arguments; the
    extension, where one is made, is ``("CUDAExtension", name, arguments)``."""
    import setuptools
    import torch.utils.cpp_extension

    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    for folder in ("mae_fast", "csrc", "cuda/bin", "cuda/lib64"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    for name in ("csrc/op.cu", "cuda/bin/nvcc", "cuda/lib64/libcudart.so"):
        (tmp_path / name).touch()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["setup.py", "--name"])
    for variable in ("MAE_FAST_SKIP_CUDA_BUILD", "MAE_FAST_FORCE_CUDA_BUILD", "MAE_FAST_CUDA_ARCHS"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in {"CUDA_HOME": str(tmp_path / "cuda"), "MAX_JOBS": "1", **env}.items():
        monkeypatch.setenv(variable, value)  # restored afterwards, also where setup.py sets them
    monkeypatch.setattr(torch.version, "cuda", "12.8" if cuda_torch else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu_visible)
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDAExtension", lambda name, **kw: ("CUDAExtension", name, kw))
    calls = []
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: calls.append(kwargs))
    runpy.run_path(str(tmp_path / "setup.py"))
    assert calls[-1]["package_data"] == {"mae_fast": [dispatch.CUDA_BUILD_SKIPPED_FILE]}  # wheels carry the note
    return calls[-1]


def test_the_build_is_skipped_where_no_gpu_is_visible_and_the_note_tells_that_from_a_failed_build(tmp_path,
                                                                                                  monkeypatch):
    package = tmp_path / "mae_fast"
    setup = run_setup(tmp_path, monkeypatch, gpu_visible=False)
    assert setup["ext_modules"] == [] and setup["cmdclass"] == {}
    note = dispatch.cuda_build_skipped(package)
    assert note.startswith(dispatch.NO_GPU_NOTE) and "MAE_FAST_FORCE_CUDA_BUILD=1" in note, note
    assert extension_verdict(True, False, note, gpu_visible=False)[0] == "skip"
    verdict, why = extension_verdict(True, False, note, gpu_visible=True)  # a GPU-less install on a GPU machine
    assert verdict == "fail" and "MAE_FAST_FORCE_CUDA_BUILD=1" in why

    setup = run_setup(tmp_path, monkeypatch, gpu_visible=True)  # a GPU: built, and the earlier note is gone
    (extension,) = setup["ext_modules"]
    assert extension[1] == "mae_fast._C" and "build_ext" in setup["cmdclass"]
    assert dispatch.cuda_build_skipped(package) is None
    assert extension_verdict(True, False, None, gpu_visible=True)[0] == "fail"  # built, yet it does not load
    assert extension_verdict(True, False, None, gpu_visible=False)[0] == "fail"

    setup = run_setup(tmp_path, monkeypatch, gpu_visible=False, MAE_FAST_SKIP_CUDA_BUILD="1")
    note = dispatch.cuda_build_skipped(package)
    assert setup["ext_modules"] == [] and "MAE_FAST_SKIP_CUDA_BUILD=1" in note and "on purpose" in note
    assert extension_verdict(True, False, note, gpu_visible=True)[0] == "skip"


def test_a_forced_build_compiles_without_a_gpu_and_fails_where_it_cannot(tmp_path, monkeypatch):
    (tmp_path / "mae_fast").mkdir()
    (tmp_path / "mae_fast" / dispatch.CUDA_BUILD_SKIPPED_FILE).write_text("an earlier install's note\n")
    setup = run_setup(tmp_path, monkeypatch, gpu_visible=False, MAE_FAST_FORCE_CUDA_BUILD="1",
                      MAE_FAST_CUDA_ARCHS="90")
    (extension,) = setup["ext_modules"]
    assert [flag for flag in extension[2]["extra_compile_args"]["nvcc"] if "arch" in flag] == [
        "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]
    assert dispatch.cuda_build_skipped(tmp_path / "mae_fast") is None
    with pytest.raises(RuntimeError, match="MAE_FAST_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built: "
                                           "torch is a CPU-only build"):
        run_setup(tmp_path, monkeypatch, gpu_visible=False, cuda_torch=False, MAE_FAST_FORCE_CUDA_BUILD="1")


@needs_extension
def test_every_op_is_registered_once_with_a_cuda_kernel():
    for name in CUDA_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mae_fast::{name}", "CUDA"), name
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"mae_fast::{name}", "CPU"), name
    # add_pos_embed alone is Triton-only (auto runs Triton for it on GPUs).
    assert all("cuda" in impls for op, impls in IMPLEMENTATIONS.items() if op != "add_pos_embed")


FAKE_SHAPES = """
import sys
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
import mae_fast.ops  # defines the CUDA ops' schemas, fakes and autograd; must not load mae_fast._C
assert "mae_fast._C" not in sys.modules, "importing mae_fast.ops loaded the extension"
ops = torch.ops.mae_fast
with FakeTensorMode():
    imgs = torch.empty(2, 3, 24, 40, device="cuda")
    ids_keep = torch.empty(2, 6, dtype=torch.long, device="cuda")
    ids_restore = torch.empty(2, 15, dtype=torch.long, device="cuda")
    assert ops.gather_patches_cuda(imgs, ids_keep, 8, None, torch.bfloat16).shape == (2, 6, 192)
    assert ops.gather_patches_cuda(imgs, ids_keep, 8, None, torch.bfloat16).dtype == torch.bfloat16
    back = ops.gather_patches_cuda_backward(torch.empty(2, 6, 192, device="cuda"), ids_keep, 8, 24, 40, torch.half)
    assert back.shape == (2, 3, 24, 40) and back.dtype == torch.half
    x = torch.empty(2, 15, 20, device="cuda", dtype=torch.bfloat16)
    assert ops.gather_tokens_cuda(x, ids_keep, None).shape == (2, 6, 20)
    restored = ops.restore_tokens_cuda(x[:, :6], ids_restore, torch.empty(20, device="cuda"), None, torch.float32)
    assert restored.shape == (2, 15, 20) and restored.dtype == torch.float32
    grad_x, grad_token = ops.restore_tokens_cuda_backward(restored, ids_restore, 6, torch.bfloat16)
    assert grad_x.shape == (2, 6, 20) and grad_x.dtype == torch.bfloat16 and grad_token.shape == (20,)
    pred = torch.empty(2, 16, 192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = torch.empty(2, 15, device="cuda")
    loss = ops.masked_patch_loss_cuda(pred, imgs, None, mask, 8, 1, True, 1e-6)
    assert loss.shape == () and loss.dtype == torch.float32
    grad_pred, grad_imgs = ops.masked_patch_loss_cuda_backward(pred, imgs, None, mask, loss, 8, 1, True, 1e-6,
                                                               True, True)
    assert grad_pred.shape == (2, 16, 192) and grad_pred.dtype == torch.bfloat16 and grad_imgs.shape == imgs.shape
# Autograd is registered too (run on meta tensors: the autograd engine needs a real device for fake CUDA ones).
pred = torch.empty(2, 16, 192, device="meta", dtype=torch.bfloat16, requires_grad=True)
imgs = torch.empty(2, 3, 24, 40, device="meta", requires_grad=True)
loss = ops.masked_patch_loss_cuda(pred, imgs, None, torch.empty(2, 15, device="meta"), 8, 1, True, 1e-6)
grad_pred, grad_imgs = torch.autograd.grad(loss, [pred, imgs])
assert grad_pred.shape == pred.shape and grad_pred.dtype == torch.bfloat16 and grad_imgs.shape == imgs.shape
rows = ops.gather_patches_cuda(imgs, torch.empty(2, 6, dtype=torch.long, device="meta"), 8, None, torch.bfloat16)
assert torch.autograd.grad(rows.sum(), imgs)[0].shape == imgs.shape
assert "mae_fast._C" not in sys.modules
print("ok")
"""


def test_fake_and_autograd_registered_at_import_without_the_extension():
    # In a fresh process: importing mae_fast.ops alone makes the CUDA ops traceable (fake tensors,
    # autograd), with nothing registered lazily while torch.compile traces.
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", FAKE_SHAPES], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-3000:]


@needs_extension
def test_vector_access_decision_refuses_offset_and_strided_views():
    # The CUDA backward kernels of gather_patches, gather_tokens and restore_tokens read grad_out in 16-byte
    # vectors only where this (their own host check) allows it. contiguous() returns an offset view unchanged.
    check = torch.ops.mae_fast.vectorizable_rows
    buffer = torch.zeros(4 * 96 + 8, dtype=torch.bfloat16)
    aligned = buffer[:4 * 96].view(4, 96)
    assert aligned.data_ptr() % 16 == 0 and check(aligned, 8)
    for offset in (1, 2, 4):  # contiguous views that start 2, 4 or 8 bytes into an aligned buffer
        view = buffer[offset:offset + 4 * 96].view(4, 96)
        assert view.is_contiguous() and view.contiguous().data_ptr() == view.data_ptr()
        assert not check(view, 8), offset
    assert check(buffer[8:8 + 4 * 96].view(4, 96), 8)  # 16 bytes in: aligned again
    assert not check(aligned[:, :90], 8)  # rows not a multiple of the vector
    assert not check(torch.zeros(4, 100, dtype=torch.bfloat16)[:, :96], 8)  # row stride 100
    assert not check(torch.zeros(96, 4, dtype=torch.bfloat16).t(), 8)  # not unit stride along rows
    assert check(aligned, 1)
    floats = torch.zeros(4 * 64 + 1)
    assert check(floats[:256].view(4, 64), 4) and not check(floats[1:257].view(4, 64), 4)


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
def test_cuda_masked_patch_loss_generic_patches_and_size_limit():
    # p=64: 12288 values per patch, the generic (looping) kernel instance; p=160: over the limit.
    imgs = torch.randn(2, 3, 128, 64, device="cuda")
    pred = torch.randn(2, 2, 3 * 64 * 64, device="cuda", requires_grad=True)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]], device="cuda")
    ref = masked_patch_loss(pred, imgs, mask, 64, backend="torch")
    got = masked_patch_loss(pred, imgs, mask, 64, backend="cuda")
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(torch.autograd.grad(got, pred)[0], torch.autograd.grad(ref, pred)[0])
    big = torch.randn(1, 3, 160, 160, device="cuda")
    big_pred = torch.randn(1, 1, 3 * 160 * 160, device="cuda")
    ones = torch.ones(1, 1, device="cuda")
    torch.testing.assert_close(masked_patch_loss(big_pred, big, ones, 160),
                               masked_patch_loss(big_pred, big, ones, 160, backend="torch"))
    with pytest.raises(BackendUnavailableError, match="at most 65536 values per patch"):
        masked_patch_loss(big_pred, big, ones, 160, backend="cuda")


@pytest.mark.gpu
@needs_extension
def test_cuda_backward_kernels_take_misaligned_gradients():
    # contiguous() hands an offset view back unchanged: the backward kernels must not use 16-byte vectors on it.
    torch.manual_seed(0)
    B, L, p, D = 2, 16, 8, 64
    ids_keep, ids_restore, _ = sample_mask(B, L, 0.75, device="cuda")
    K = ids_keep.shape[1]
    N = 3 * p * p
    for dtype in (torch.bfloat16, torch.float32):
        buffer = torch.randn(B * K * N + 1, device="cuda", dtype=dtype)
        grad = buffer[1:].view(B, K, N)
        assert grad.is_contiguous() and not torch.ops.mae_fast.vectorizable_rows(grad, 16 // grad.element_size())
        got = torch.ops.mae_fast.gather_patches_cuda_backward(grad, ids_keep, p, 32, 32, dtype)
        imgs = torch.zeros(B, 3, 32, 32, device="cuda", dtype=dtype, requires_grad=True)
        expected, = torch.autograd.grad(gather_patches(imgs, ids_keep, p, backend="torch"), imgs, grad)
        assert torch.equal(got, expected)
        tokens = torch.randn(B * K * D + 1, device="cuda", dtype=dtype)[1:].view(B, K, D)
        x = torch.zeros(B, L, D, device="cuda", dtype=dtype, requires_grad=True)
        expected, = torch.autograd.grad(gather_tokens(x, ids_keep, None, backend="torch"), x, tokens)
        assert torch.equal(torch.ops.mae_fast.gather_tokens_cuda_backward(tokens, ids_keep, L), expected)
        full = torch.randn(B * L * D + 1, device="cuda", dtype=dtype)[1:].view(B, L, D)
        grad_x, grad_token = torch.ops.mae_fast.restore_tokens_cuda_backward(full, ids_restore, K, dtype)
        xv = torch.zeros(B, K, D, device="cuda", dtype=dtype, requires_grad=True)
        token = torch.zeros(D, device="cuda", requires_grad=True)
        ref_x, ref_token = torch.autograd.grad(restore_tokens(xv, ids_restore, token, None, backend="torch"),
                                               [xv, token], full)
        assert torch.equal(grad_x, ref_x)
        torch.testing.assert_close(grad_token, ref_token.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_extension
def test_cuda_restore_tokens_backward_is_exact_and_deterministic():
    # ViT-B/16's decoder (B 256, L 196, D 512: hundreds of partial sums per column), and a batch smaller than the
    # grid (fewer partial sums than the summing kernel's slices, some slices empty).
    torch.manual_seed(0)
    for B, L, D, ratio in ((256, 196, 512, 0.75), (1, 4, 40, 0.5)):
        _, ids_restore, _ = sample_mask(B, L, ratio, device="cuda")
        K = L - int(L * ratio)
        grad = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16)
        first = torch.ops.mae_fast.restore_tokens_cuda_backward(grad, ids_restore, K, torch.bfloat16)
        again = torch.ops.mae_fast.restore_tokens_cuda_backward(grad, ids_restore, K, torch.bfloat16)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])  # same order, same bits
        xv = torch.zeros(B, K, D, device="cuda", dtype=torch.float64, requires_grad=True)
        token = torch.zeros(D, device="cuda", dtype=torch.float64, requires_grad=True)
        ref_x, ref_token = torch.autograd.grad(restore_tokens(xv, ids_restore, token, None, backend="torch"),
                                               [xv, token], grad.double())
        assert torch.equal(first[0].double(), ref_x)  # a copy: exact
        # A float32 sum of n terms: within n * 2^-24 of the float64 sum of their magnitudes.
        n = B * (L - K)
        bound = n * 2.0**-24 * torch.autograd.grad(restore_tokens(xv, ids_restore, token, None, backend="torch"),
                                                   [token], grad.double().abs())[0]
        assert ((first[1].double() - ref_token).abs() <= bound + 1e-12).all()


@pytest.mark.gpu
@needs_extension
def test_cuda_restore_tokens_backward_at_the_shared_memory_limit():
    # The widest D is the device's per-block shared memory (48 KiB without opting in) in float32 sums; the kernel
    # has no static shared memory, so D = 12288 launches, and one more vector's width is refused in one line.
    limit = torch.cuda.get_device_properties(0).shared_memory_per_block // 4
    _, ids_restore, _ = sample_mask(1, 4, 0.5, device="cuda")
    grad = torch.randn(1, 4, limit, device="cuda")
    grad_x, grad_token = torch.ops.mae_fast.restore_tokens_cuda_backward(grad, ids_restore, 2, torch.float32)
    xv = torch.zeros(1, 2, limit, device="cuda", requires_grad=True)
    token = torch.zeros(limit, device="cuda", requires_grad=True)
    ref_x, ref_token = torch.autograd.grad(restore_tokens(xv, ids_restore, token, None, backend="torch"), [xv, token],
                                           grad)
    assert torch.equal(grad_x, ref_x)
    torch.testing.assert_close(grad_token, ref_token)
    with pytest.raises(RuntimeError, match=f"handles D up to {limit}"):
        torch.ops.mae_fast.restore_tokens_cuda_backward(torch.randn(1, 4, limit + 4, device="cuda"), ids_restore, 2,
                                                        torch.float32)


@pytest.mark.gpu
@needs_extension
def test_cuda_loss_names_a_cpu_pred():
    # The device guard comes after the checks: a CPU pred with CUDA images is named, not an internal assert.
    imgs = torch.randn(1, 3, 16, 16, device="cuda")
    mask = torch.ones(1, 1, device="cuda")
    for op, extra in ((torch.ops.mae_fast.masked_patch_loss_cuda, ()),
                      (torch.ops.mae_fast.masked_patch_loss_cuda_backward, (torch.ones((), device="cuda"),))):
        args = (torch.randn(1, 1, 768), imgs, None, mask, *extra, 16, 0, True, 1e-6)
        with pytest.raises(RuntimeError, match="pred must be a CUDA tensor, got device cpu"):
            op(*args, *((True, False) if extra else ()))
