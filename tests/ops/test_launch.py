"""Triton launches: parameters from the fixed rule (autotuning only when asked), on the tensors' own device."""

import contextlib

import pytest
import torch

pytest.importorskip("triton")

from mae_fast.kernels import _launch  # noqa: E402


class FakeKernel:
    """Records ``kernel[grid](*args, **kwargs)`` calls (and what device was current for them)."""

    def __init__(self, log, name):
        self.log, self.name = log, name

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            meta = dict(kwargs)
            self.log.append((self.name, grid(meta) if callable(grid) else grid, meta, list(_CURRENT)))
        return run


_CURRENT: list = []


@contextlib.contextmanager
def fake_device(device):
    _CURRENT.append(torch.device(device))
    try:
        yield
    finally:
        _CURRENT.pop()


@pytest.fixture
def compiled_mode(monkeypatch):
    """As on a GPU: not interpreted, and torch.cuda.device replaced by a recorder."""
    monkeypatch.setattr(_launch, "interpreted", lambda: False)
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    monkeypatch.delenv("MAE_FAST_TRITON_AUTOTUNE", raising=False)


def test_fixed_rule_for_the_vit_shapes():
    assert _launch.row_tile(1024) == (4, 8)  # ViT-B/16 patch rows (768 values) and token rows (768 channels)
    assert _launch.row_tile(512) == (8, 8)  # decoder rows
    assert _launch.row_tile(64) == (16, 4)
    assert _launch.row_tile(8192) == (1, 8)
    for width in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
        rows, warps = _launch.row_tile(width)
        assert rows & (rows - 1) == 0 and 1 <= rows <= _launch.MAX_ROWS and warps in (4, 8)


def test_training_path_never_autotunes(compiled_mode):
    log = []
    grid = lambda meta: (100 // meta["ROWS"],)  # noqa: E731
    _launch.launch(FakeKernel(log, "plain"), FakeKernel(log, "tuned"), grid, torch.zeros(2), tile_width=1024, P=16)
    assert [(name, g, meta) for name, g, meta, _ in log] == [("plain", (25,), {"ROWS": 4, "num_warps": 8, "P": 16})]


def test_autotuning_is_an_opt_in(compiled_mode, monkeypatch):
    monkeypatch.setenv("MAE_FAST_TRITON_AUTOTUNE", "1")
    log = []
    _launch.launch(FakeKernel(log, "plain"), FakeKernel(log, "tuned"), lambda meta: (1,), torch.zeros(2),
                   tile_width=1024)
    assert [name for name, *_ in log] == ["tuned"]
    monkeypatch.setattr(_launch, "interpreted", lambda: True)  # never in the interpreter
    assert not _launch.autotuning()


def test_launch_runs_under_the_device_of_its_tensors(compiled_mode):
    # Tensors on cuda:1 while device 0 is current: the launch must make cuda:1 current (Triton launches on the
    # current device). Fake CUDA tensors stand in for real ones on this CPU-only check.
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        on_1 = torch.empty(4, device="cuda:1")
    log = []
    _launch.launch(FakeKernel(log, "plain"), None, lambda meta: (1,), on_1, torch.zeros(1), tile_width=64)
    _launch.launch_fixed(FakeKernel(log, "fixed"), (1,), on_1)
    assert [current for *_, current in log] == [[torch.device("cuda:1")], [torch.device("cuda:1")]]
    log.clear()
    _launch.launch(FakeKernel(log, "plain"), None, lambda meta: (1,), torch.zeros(4), tile_width=64)
    assert log[0][3] == []  # CPU tensors (the interpreter): no device switch


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_ops_on_a_second_gpu_while_the_first_is_current():
    from mae_fast.ops import gather_patches, masked_patch_loss, sample_mask
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    imgs = torch.randn(4, 3, 32, 32, device=dev)
    ids_keep, _, mask = sample_mask(4, 16, 0.75, device=dev)
    torch.testing.assert_close(gather_patches(imgs, ids_keep, 8, backend="triton"),
                               gather_patches(imgs, ids_keep, 8, backend="torch"), rtol=0, atol=0)
    pred = torch.randn(4, 16, 192, device=dev, requires_grad=True)
    got = masked_patch_loss(pred, imgs, mask, 8, backend="triton")
    ref = masked_patch_loss(pred, imgs, mask, 8, backend="torch")
    torch.testing.assert_close(got, ref)
    assert torch.cuda.current_device() == 0


def test_two_runs_of_the_triton_step_are_bitwise_equal():
    # No autotuning: the launch parameters, hence every reduction order, are the same in every run.
    from mae_fast.model import MAEViT
    if _launch.interpreted() is False and not torch.cuda.is_available():
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = MAEViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                       decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True, kernel_backend="triton").to(dev)
        imgs = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, device=dev)
        loss, _, _ = model(imgs, 0.75, noise=torch.rand(3, 16, device=dev))
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert len(runs[0][1]) > 10 and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_patch_rows_wider_than_the_tile_go_to_another_backend():
    # The patch ops keep a whole patch row in one Triton tile: p = 32 (3,072 values, a 4,096 tile) is the widest
    # Triton takes; p = 64 (12,288 values) is refused by an explicit request and passed over by "auto".
    from mae_fast.ops import BackendUnavailableError, dispatch, gather_patches, masked_patch_loss, sample_mask
    assert dispatch.triton_row_unfit(3 * 32 * 32) == {}
    assert "12288 needs 16384" in dispatch.triton_row_unfit(3 * 64 * 64)["triton"]
    ids_keep, _, mask = sample_mask(1, 4, 0.5)
    imgs = torch.randn(1, 3, 128, 128)
    with pytest.raises(BackendUnavailableError, match="patch rows of at most 4096 values"):
        gather_patches(imgs, ids_keep, 64, backend="triton")
    with pytest.raises(BackendUnavailableError, match="patch rows of at most 4096 values"):
        masked_patch_loss(torch.randn(1, 4, 3 * 64 * 64), imgs, mask, 64, backend="triton")
    if dispatch._why_not("triton", [imgs]) is None:  # the interpreter, or a GPU: the widest tile runs and is right
        small = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(gather_patches(small, ids_keep, 32, backend="triton"),
                                   gather_patches(small, ids_keep, 32, backend="torch"), rtol=0, atol=0)
