"""The whole step compiles as one graph: forward and loss with the fused ops in it, and its backward.

Zero graph breaks (``fullgraph=True`` raises on one) and zero recompilations across steps with new
masks and across ``train()``/``eval()`` switches are the CPU evidence that the step has no
data-dependent host synchronization. The ``aot_eager`` backend traces forward and backward as the
default one does, without spending minutes generating CPU code.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from mae_fast import create_model
from mae_fast.ops.dispatch import _why_not


def kernel_backends():
    params = [pytest.param("torch", id="torch")]
    reason = _why_not("triton", [torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu")])
    params.append(pytest.param("triton", id="triton", marks=pytest.mark.skipif(bool(reason), reason=str(reason))))
    return params


@pytest.mark.parametrize("kernel_backend", kernel_backends())
def test_the_step_is_one_graph_with_no_recompilation(kernel_backend):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch._dynamo.reset()
    model = create_model("mae_vit_tiny_patch16", img_size=32, kernel_backend=kernel_backend).to(device)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(model, fullgraph=True, backend=counter)
    images = torch.randn(4, 3, 32, 32, device=device)

    def train_step(valid=torch.ones(4, device=device)):
        loss, _, _ = step(images, mask_ratio=0.75, noise=torch.rand(4, 4, device=device),  # a new mask each step
                          valid=valid)
        loss.backward()
        return loss

    for _ in range(3):
        train_step()
    train_step(torch.tensor([1.0, 0.0, 1.0, 1.0], device=device))  # a marked slot weighs 0, on the device
    assert counter.frame_count == 1  # one graph, whatever the mask and the marked slots
    model.eval()
    with torch.no_grad():
        step(images, mask_ratio=0.75, noise=torch.rand(4, 4, device=device))
    assert counter.frame_count == 2  # the no-grad graph of validation, once
    train_step()  # eval() with gradients: the same graph as training
    for _ in range(2):
        model.train()
        train_step()
        model.eval()
        with torch.no_grad():
            step(images, mask_ratio=0.75, noise=torch.rand(4, 4, device=device))
    assert counter.frame_count == 2  # switching back and forth compiles nothing more
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.gpu
def test_the_compiled_step_never_synchronizes_with_the_host():
    from mae_fast.monitor import LossWatch

    device = torch.device("cuda")
    model = create_model("mae_vit_tiny_patch16", img_size=64).to(device)
    step = torch.compile(model, fullgraph=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    generator = torch.Generator(device=device).manual_seed(0)
    watch = LossWatch(device)
    images = torch.randn(8, 3, 64, 64, device=device)
    marked = torch.tensor([1.0] * 7 + [0.0]).pin_memory()  # a batch with a marked slot, as the trainer copies it

    def train_step(index):
        noise = torch.rand(8, model.num_patches, device=device, generator=generator)
        valid = marked.to(device, non_blocking=True) if index % 2 else torch.ones(8, device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _, _ = step(images, mask_ratio=0.75, noise=noise, valid=valid)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        watch.observe(loss.detach(), index)

    for index in range(3):  # compile and warm up outside the check
        train_step(index)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for index in range(3, 8):
            train_step(index)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert watch.stats().first_nonfinite == -1
