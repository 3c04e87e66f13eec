"""The CascadeFeatureFusion module (fused in inference, plain composition with live BatchNorm statistics),
torch.compile through the op, and opcheck of every implementation of the op."""

import copy

import pytest
import torch
import torch.nn.functional as F

import icnet_kernels
from icnet_kernels import CascadeFeatureFusion
from tests.cascade_feature_fusion_cases import (
    MODULE_CASES, Geometry, composition, gradient_atol, make_inputs, random_module)
from tests.helpers import ATOL, DispatchedOps, assert_within_budget, backend_cases, in_layout, op_cases


@pytest.mark.parametrize("name,device", op_cases("cascade_feature_fusion"))
@pytest.mark.parametrize("g", [Geometry(2, 3, 2, 4, 3, 4, 5, 7, 2, True), Geometry(1, 2, 3, 3, 3, 3, 6, 5, 1, False)],
                         ids=["shortcut", "general"])
def test_opcheck(name, device, g):
    op = getattr(torch.ops.icnet, name)
    inputs = make_inputs(g, device=device, seed=9)
    folded = (inputs["weight_low"], inputs["weight_high"], inputs["shift_low"] + inputs["shift_high"])
    for layout in ("contiguous", "channels_last"):
        low, high = in_layout(inputs["low"], layout), in_layout(inputs["high"], layout)
        args = [t.detach().clone().requires_grad_() for t in (low, high, *folded)]
        torch.library.opcheck(op, (*args, g.dilation, g.align_corners))
        torch.library.opcheck(op, (low, high, *folded, g.dilation, g.align_corners))


def test_torch_compile_fullgraph():
    class Fusion(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.reduce = torch.nn.Conv2d(6, 4, 1)
            self.cff = random_module(4, 3, 8, seed=1)

        def forward(self, low, high):
            return self.cff(self.reduce(low), high) * 2

    model = Fusion().eval()
    low, high = torch.randn(2, 6, 5, 9), torch.randn(2, 3, 9, 17)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(low, high), model(low, high))
        general = torch.randn(2, 3, 10, 12)
        torch.testing.assert_close(compiled(low, general), model(low, general))


@pytest.fixture
def fused_calls(monkeypatch):
    """The calls CascadeFeatureFusion makes to the fused op (on its folded weights)."""
    calls = []
    function = icnet_kernels.nn.cascade_feature_fusion_folded

    def spy(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    monkeypatch.setattr(icnet_kernels.nn, "cascade_feature_fusion_folded", spy)
    return calls


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("dilation,align_corners", MODULE_CASES)
def test_module_eval_matches_composition(backend, device, dilation, align_corners, fused_calls):
    module = random_module(5, 3, 6, dilation, align_corners, backend, seed=2).to(device).eval()
    low, high = torch.randn(2, 5, 4, 6, device=device), torch.randn(2, 3, 7, 11, device=device)
    with torch.no_grad():
        out = module(low, high)
        assert len(fused_calls) == 1, "eval mode must take the fused op"
        exact = composition(copy.deepcopy(module).double(), low.double(), high.double())
        assert_within_budget(out, exact, composition(module, low, high), ATOL[torch.float32], "eval module")
        out2, up = module(low, high, return_upsampled=True)
    assert torch.equal(out2, out)
    assert torch.equal(up, F.interpolate(low, size=(7, 11), mode="bilinear", align_corners=align_corners))


@pytest.mark.parametrize("dilation,align_corners", MODULE_CASES)
def test_module_training_uses_batch_statistics(dilation, align_corners, fused_calls):
    module = random_module(5, 3, 6, dilation, align_corners, seed=3).train()
    twin = copy.deepcopy(module)
    low, high = torch.randn(2, 5, 4, 6), torch.randn(2, 3, 7, 11)
    out, up = module(low, high, return_upsampled=True)
    assert not fused_calls, "live batch statistics cannot be folded"
    torch.testing.assert_close(out, composition(twin, low, high), rtol=0, atol=0)
    assert torch.equal(up, F.interpolate(low, size=(7, 11), mode="bilinear", align_corners=align_corners))
    for key, value in module.state_dict().items():  # running statistics moved exactly as the composition's did
        torch.testing.assert_close(value, twin.state_dict()[key], rtol=0, atol=0, msg=key)
    assert module.bn_low.num_batches_tracked.item() == 1


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("dilation,align_corners", MODULE_CASES)
def test_module_frozen_batch_norm_is_fused_and_differentiable(backend, device, dilation, align_corners, fused_calls):
    module = random_module(5, 3, 6, dilation, align_corners, backend, seed=4).to(device).train()
    module.bn_low.eval()
    module.bn_high.eval()
    low, high = torch.randn(2, 5, 4, 6, device=device), torch.randn(2, 3, 7, 11, device=device)
    grad_out = torch.randn(2, 6, 7, 11, device=device)
    exact_module = copy.deepcopy(module).double()
    same_module = copy.deepcopy(module)
    running = [t.clone() for t in (module.bn_low.running_mean, module.bn_low.running_var)]

    module(low, high).backward(grad_out)
    assert len(fused_calls) == 1, "frozen BatchNorm must take the fused op"
    assert torch.equal(module.bn_low.running_mean, running[0]) and torch.equal(module.bn_low.running_var, running[1])
    composition(exact_module, low.double(), high.double()).backward(grad_out.double())
    composition(same_module, low, high).backward(grad_out)
    exact, same = dict(exact_module.named_parameters()), dict(same_module.named_parameters())
    for name, p in module.named_parameters():
        assert p.grad is not None, name
        assert_within_budget(p.grad, exact[name].grad, same[name].grad,
                             gradient_atol(exact[name].grad, torch.float32), f"grad {name}")


def test_module_state_dict_matches_plain_layers():
    module = CascadeFeatureFusion(4, 3, 8)
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    assert set(module.state_dict()) == {"conv_low.weight", "conv_high.weight", *(f"bn_low.{k}" for k in bn),
                                        *(f"bn_high.{k}" for k in bn)}
    assert module.conv_low.weight.shape == (8, 4, 3, 3) and module.conv_high.weight.shape == (8, 3, 1, 1)
    assert module.conv_low.dilation == (2, 2) and module.conv_low.padding == (2, 2)
    assert module.conv_low.bias is None and module.conv_high.bias is None


@pytest.mark.parametrize("backend,device", [c for c in backend_cases() if c.values[0] == "native"])
def test_cached_inference_call_dispatches_the_fused_op_alone(backend, device):
    """After the first inference call the folded weights are kept: a call does no host-side folding."""
    module = random_module(5, 3, 6, seed=6).to(device).eval()
    low, high = torch.randn(2, 5, 4, 6, device=device), torch.randn(2, 3, 7, 11, device=device)
    with torch.inference_mode():
        first = module(low, high)
        with DispatchedOps() as mode:
            second = module(low, high)
    assert mode.ops == ["icnet.cascade_feature_fusion"]
    assert torch.equal(first, second)



@pytest.mark.parametrize("backend,device", backend_cases())
def test_inference_mode_gives_the_no_grad_answer_and_keeps_the_folded_weights(backend, device):
    """Under inference mode the kept folded weights are ordinary tensors: the Triton kernels' laid-out copies
    follow their versions, which inference tensors do not have."""
    module = random_module(5, 3, 6, backend=backend, seed=8).to(device).eval()
    low, high = torch.randn(2, 5, 4, 6, device=device), torch.randn(2, 3, 7, 11, device=device)
    with torch.no_grad():
        expected = module(low, high)
    module._folded = type(module._folded)()  # fold again, this time under inference mode
    with torch.inference_mode():
        first, second = module(low, high), module(low, high)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert not any(t.is_inference() for t in module._folded._value)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_a_module_made_under_inference_mode_folds_on_every_call(backend, device):
    """Its parameters are inference tensors, whose in-place changes leave no trace: nothing may be kept."""
    with torch.inference_mode():
        module = random_module(5, 3, 6, backend=backend, seed=9).to(device).eval()
        low, high = torch.randn(1, 5, 4, 6, device=device), torch.randn(1, 3, 7, 11, device=device)
        module(low, high)
        module.conv_high.weight.add_(0.5)
        out = module(low, high)
        expected = composition(module, low, high)
        exact = composition(copy.deepcopy(module).double(), low.double(), high.double())
    assert_within_budget(out, exact, expected, ATOL[torch.float32], "after an in-place change")


@pytest.mark.parametrize("backend,device", backend_cases())
def test_the_op_follows_in_place_changes_of_inference_tensor_weights(backend, device):
    """Weights made under inference mode keep no version counter: no laid-out copy of them may be kept."""
    gen = torch.Generator().manual_seed(10)
    with torch.inference_mode():
        low, high = (torch.randn(1, 5, 4, 6, generator=gen).to(device),
                     torch.randn(1, 3, 7, 11, generator=gen).to(device))
        w_low, w_high = (torch.randn(6, 5, 3, 3, generator=gen).to(device),
                         torch.randn(6, 3, 1, 1, generator=gen).to(device))
        icnet_kernels.cascade_feature_fusion(low, high, w_low, w_high, backend=backend)  # no BatchNorm: as given
        w_low.mul_(-1.0)
        w_high.add_(0.5)
        out = icnet_kernels.cascade_feature_fusion(low, high, w_low, w_high, backend=backend)
        one, zero = torch.ones(6, device=device), torch.zeros(6, device=device)
        ordered = (w_low, one, zero, w_high, one, zero)
        exact = icnet_kernels.cascade_feature_fusion_reference(low.double(), high.double(),
                                                               *(t.double() for t in ordered))
        same = icnet_kernels.cascade_feature_fusion_reference(low, high, *ordered)
    assert_within_budget(out, exact, same, ATOL[torch.float32], "after an in-place change")


def test_kept_folded_weights_follow_parameter_changes():
    module = random_module(5, 3, 6, seed=7).eval()
    low, high = torch.randn(1, 5, 4, 6), torch.randn(1, 3, 7, 11)
    with torch.no_grad():
        module(low, high)
        module.bn_low.running_var.mul_(4.0)   # in place: the version moves
        module.conv_high.weight.add_(0.5)
        out = module(low, high)
        expected = composition(module, low, high)
    assert_within_budget(out, composition(copy.deepcopy(module).double(), low.double(), high.double()), expected,
                         ATOL[torch.float32], "after in-place changes")
