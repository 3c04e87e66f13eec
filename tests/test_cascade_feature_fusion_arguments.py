"""Cascade feature fusion's argument checks: the public function, the raw ops and the fake kernel reject the
same bad input with a ValueError that names the argument."""

import pytest
import torch

import icnet_kernels
from icnet_kernels import cascade_feature_fusion
from tests.cascade_feature_fusion_cases import BASE, bad, make_inputs


BAD_INPUTS = {  # id: (inputs, dilation, the argument the message must name)
    "weight_low-channels": (bad(weight_low=lambda t: torch.randn(4, 2, 3, 3)), 2, "weight_low"),
    "weight_low-kernel": (bad(weight_low=lambda t: torch.randn(4, 3, 1, 1)), 2, "weight_low"),
    "weight_low-rank": (bad(weight_low=lambda t: torch.randn(4, 27)), 2, "weight_low"),
    "weight_high-channels": (bad(weight_high=lambda t: torch.randn(4, 3)), 2, "weight_high"),
    "weight_high-out-channels": (bad(weight_high=lambda t: torch.randn(5, 2)), 2, "weight_high"),
    "weight_high-kernel": (bad(weight_high=lambda t: torch.randn(4, 2, 3, 3)), 2, "weight_high"),
    "high-shorter": (bad(high=lambda t: torch.randn(2, 2, 2, 7)), 2, "high"),
    "high-narrower": (bad(high=lambda t: torch.randn(2, 2, 5, 3)), 2, "high"),
    "dtype-mix": (bad(high=lambda t: t["high"].double()), 2, "high"),
    "batch-mix": (bad(high=lambda t: t["high"][:1]), 2, "high's batch"),
    "low-rank": (bad(low=lambda t: t["low"][0]), 2, "low"),
    "high-rank": (bad(high=lambda t: t["high"][:, :, :, :, None]), 2, "high"),
    "low-integer": (bad(low=lambda t: t["low"].long()), 2, "low"),
    "low-empty-map": (bad(low=lambda t: torch.randn(2, 3, 0, 4)), 2, "low"),
    "dilation-0": (bad(), 0, "dilation"),
    "dilation-negative": (bad(), -2, "dilation"),
    "dilation-beyond-int32": (bad(), 2**31, "dilation"),
}

FUNCTION_ONLY_BAD_INPUTS = {
    "scale_low-length": (bad(scale_low=lambda t: torch.randn(5)), 2, "scale_low"),
    "shift_low-length": (bad(shift_low=lambda t: torch.randn(3)), 2, "shift_low"),
    "scale_high-rank": (bad(scale_high=lambda t: torch.randn(4, 1)), 2, "scale_high"),
    "shift_high-length": (bad(shift_high=lambda t: torch.randn(1)), 2, "shift_high"),
    "weight_low-dtype": (bad(weight_low=lambda t: t["weight_low"].double()), 2, "weight_low"),
    "dilation-bool": (bad(), True, "dilation"),
    "no-output-channels": (bad(weight_low=lambda t: torch.randn(0, 3, 3, 3), weight_high=lambda t: torch.randn(0, 2),
                               **{k: (lambda t: None) for k in ("scale_low", "shift_low", "scale_high", "shift_high")}),
                           2, "weight_low"),
    "dilation-float": (bad(), 2.0, "dilation"),
    "scale_low-float": (bad(scale_low=lambda t: 1.5), 2, "scale_low"),
    "weight_low-list": (bad(weight_low=lambda t: t["weight_low"].tolist()), 2, "weight_low"),
    "shift_high-complex": (bad(shift_high=lambda t: t["shift_high"].to(torch.complex64)), 2, "shift_high"),
    "scale_high-integer": (bad(scale_high=lambda t: t["scale_high"].long()), 2, "scale_high"),
}


def params(cases):
    return [pytest.param(*case, id=name) for name, case in cases.items()]


@pytest.mark.parametrize("backend", ["native", "triton", "reference"])
@pytest.mark.parametrize("make,dilation,message", params({**BAD_INPUTS, **FUNCTION_ONLY_BAD_INPUTS}))
def test_bad_input_is_rejected_with_the_argument_named(backend, make, dilation, message):
    if backend == "native" and not icnet_kernels.native_available():
        pytest.skip("_C not built")
    with pytest.raises(ValueError, match=message):
        cascade_feature_fusion(**make(), dilation=dilation, backend=backend)


OP_ONLY_BAD_INPUTS = {  # id: (inputs, dilation, argument, bias factory or None for a valid bias)
    "bias-length": (bad(), 2, "bias", lambda t: torch.randn(5)),
    "bias-rank": (bad(), 2, "bias", lambda t: torch.randn(4, 1)),
    "bias-dtype": (bad(), 2, "bias", lambda t: torch.randn(4, dtype=torch.float64)),
    "weight_high-4d": (bad(weight_high=lambda t: t["weight_high"][:, :, None, None]), 2, "weight_high", None),
    "weight_low-dtype": (bad(weight_low=lambda t: t["weight_low"].double()), 2, "weight_low", None),
}


def raw_op_cases():
    cases = [pytest.param("cascade_feature_fusion_triton", "cpu", id="triton"),
             pytest.param("cascade_feature_fusion_triton", "meta", id="triton-fake")]
    if icnet_kernels.native_available():
        cases += [pytest.param("cascade_feature_fusion", "cpu", id="native"),
                  pytest.param("cascade_feature_fusion", "meta", id="native-fake")]
    return cases


@pytest.mark.parametrize("name,device", raw_op_cases())
@pytest.mark.parametrize("make,dilation,message,bias",
                         params({**{k: (*v, None) for k, v in BAD_INPUTS.items()}, **OP_ONLY_BAD_INPUTS}))
def test_op_called_directly_checks_its_arguments(name, device, make, dilation, message, bias):
    """Every implementation, the fake kernel (meta tensors, what torch.compile traces) included, rejects the
    same input with a ValueError naming the argument."""
    t = {k: v.to(device) for k, v in make().items()}
    bias = t["shift_low"] if bias is None else bias(t).to(device)
    with pytest.raises(ValueError, match=message):
        getattr(torch.ops.icnet, name)(t["low"], t["high"], t["weight_low"], t["weight_high"], bias, dilation, True)


@pytest.mark.parametrize("name,device", raw_op_cases())
def test_valid_arguments_pass_every_check(name, device):
    """The other side of the checks: the valid base case is accepted everywhere (so the cases above fail
    for their edit, not for the base)."""
    t = {k: v.to(device) for k, v in make_inputs(BASE).items()}
    out = getattr(torch.ops.icnet, name)(t["low"], t["high"], t["weight_low"], t["weight_high"], t["shift_low"],
                                         2, True)
    assert out.shape == (BASE.n, BASE.co, BASE.H, BASE.W) and out.device.type == device
