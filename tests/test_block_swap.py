"""--blocks_to_swap: the BlockSwapper changes no loss and no gradient.

No GPU here, so the swapper runs its schedule with a simulated device split: an evicted
block's tensors are replaced by empty placeholders, so any use of a block that is not
resident fails instead of silently reading weights. Same loss and LoRA gradients as
without swapping (bit for bit), with and without gradient checkpointing, in forward-only
(no_grad) passes too, and at most two swapped blocks resident at a time. A schedule
without the backward hooks fails, which shows the placeholders have teeth.
"""

from __future__ import annotations

import pytest
import torch

from flux_helpers import random_inputs, tiny_flux_files
from library.errors import UserInputError
from library.training.block_swap import BlockSwapper, flux_swap_counts


def _setup(swap: int, checkpointing: bool, device: str = "cpu"):
    """Tiny FLUX with a random LoRA; on the CPU the swap is simulated, on CUDA it is real."""
    import networks.lora_flux as lf
    from library.models.flux.loading import load_flux_transformer

    flux = load_flux_transformer(tiny_flux_files("flux-dev")["flux"])
    flux.requires_grad_(False)
    net = lf.create_network(1.0, 4, 2.0, None, None, flux)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    net.apply_to(None, flux, False, True)
    swapper = BlockSwapper.create(flux, swap, device, simulate=device == "cpu") if swap else None
    if swapper is None:
        flux.to(device)
    net.to(device)
    if checkpointing:
        flux.enable_gradient_checkpointing()
    flux.train()
    return flux, net, swapper


def _step(flux, net, inp):
    for p in net.parameters():
        p.grad = None
    loss = flux(**inp).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_swapping_gives_the_same_loss_and_gradients(checkpointing):
    flux0, net0, _ = _setup(0, checkpointing)
    flux1, net1, swapper = _setup(4, checkpointing)
    assert swapper.swapped == [("double", 0), ("double", 1), ("single", 0), ("single", 1), ("single", 2),
                               ("single", 3)]
    inp = random_inputs(flux0.config, batch=2)
    for _ in range(2):  # the second step starts from the state the first left behind
        loss0, grads0 = _step(flux0, net0, inp)
        loss1, grads1 = _step(flux1, net1, inp)
        assert torch.equal(loss0, loss1)
        assert grads0.keys() == grads1.keys()
        for k in grads0:
            assert torch.equal(grads0[k], grads1[k]), k
    assert swapper.max_resident <= 2
    with torch.no_grad():  # previews / validation: forward only
        assert torch.equal(flux0(**inp), flux1(**inp))


def test_a_schedule_without_backward_hooks_fails():
    flux, net, swapper = _setup(4, True)
    swapper._make_backward_hook = lambda key: (lambda grad: grad)  # noqa: E731
    swapper._hooks.clear()
    for k, block in swapper.blocks.items():
        block._forward_hooks.clear()
        swapper._hooks.append(block.register_forward_hook(swapper._make_forward_hook(k)))
    with pytest.raises(RuntimeError):
        _step(flux, net, random_inputs(flux.config, batch=1))


def test_swap_counts_and_limits():
    assert flux_swap_counts(18, 19, 38) == (9, 18)  # --split_mode's value on the full model
    assert flux_swap_counts(1, 19, 38) == (0, 2)
    with pytest.raises(UserInputError, match="at most 4"):
        flux_swap_counts(5, 2, 4)
    # without CUDA (and not simulated) there is nothing to swap with
    from library.models.flux.loading import load_flux_transformer

    flux = load_flux_transformer(tiny_flux_files("flux-dev")["flux"])
    assert BlockSwapper.create(flux, 2, "cpu") is None and flux.block_swap is None


def test_fp8_storage_keeps_no_upcast_copies_for_backward():
    """--fp8_base layers hand backward their stored fp8 weight, not the bf16 copy made for the
    call: what autograd keeps for a frozen model is about 1 byte per weight, and the input
    gradients equal those of the upcast weights."""
    from library.training.model_options import store_weights_in_fp8

    torch.manual_seed(0)
    fp8 = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    store_weights_in_fp8(fp8, torch.bfloat16)
    ref = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    ref.load_state_dict({k: v.float() for k, v in fp8.state_dict().items()})
    for m in (fp8, ref):
        m.requires_grad_(False)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    x = torch.randn(2, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8(x)
    weight_bytes = sum(saved)
    assert weight_bytes < 2 * 64 * 256 + 4 * 2 * 256 * 4  # fp8 weights (+ small activations), no bf16 copies
    y.float().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref(x2).float().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device: the real swap (pinned CPU homes, copies on a CUDA stream) needs one")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_swapping_on_cuda_streams(checkpointing):
    """On a GPU: the same losses and LoRA gradients as the model held wholly on the device,
    and less device memory at the peak (the swapped blocks visit one or two at a time)."""
    results = []
    for swap in (0, 4):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        flux, net, swapper = _setup(swap, checkpointing, "cuda")
        assert (swapper is not None) == bool(swap)
        inp = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v
               for k, v in random_inputs(flux.config, batch=2).items()}
        loss, grads = _step(flux, net, inp)
        torch.cuda.synchronize()
        results.append((loss.cpu(), {k: v.cpu() for k, v in grads.items()}, torch.cuda.max_memory_allocated() - base))
        del flux, net, swapper, inp
    (loss0, grads0, peak0), (loss1, grads1, peak1) = results
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-6)
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], rtol=1e-5, atol=1e-6)
    print(f"CUDA peak memory: whole model {peak0 / 2**20:.1f} MiB, 4 blocks swapped {peak1 / 2**20:.1f} MiB")
    assert peak1 < peak0
