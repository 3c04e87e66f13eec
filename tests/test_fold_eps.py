"""BatchNorm folding, alone: ICNet's ConvBN and the CascadeFeatureFusion module, fused against unfused, at
float32 tolerance.

The running variances are drawn around 1e-4, a tenth of which is BatchNorm's eps (1e-5): a fold that
forgot eps would be off by about 5%, where the whole-model parity tests (variances near 1, rtol 1e-3) see
a change of about 1e-5. The folds are cached for inference, so the tests also change the statistics and
weights in place between calls and expect the new values to count.
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import icnet_kernels
from icnet.layers import ConvBN
from icnet_kernels import CascadeFeatureFusion

ATOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def assert_within_budget(actual, exact, same_precision, atol, what):
    """error <= 2 x the error of the same-precision unfused run + atol."""
    err = (actual.double() - exact.double()).abs().max().item()
    err_torch = (same_precision.double() - exact.double()).abs().max().item()
    assert err <= 2 * err_torch + atol, f"{what}: error {err:.3e} > 2 x unfused's {err_torch:.3e} + {atol:.1e}"


def randomise_batch_norm(bn: torch.nn.BatchNorm2d, gen: torch.Generator, variance: float):
    """Running statistics with variances around `variance`, and a gamma of about sqrt(variance) so that the
    normalised outputs stay O(1)."""
    c = bn.num_features
    with torch.no_grad():
        bn.running_var.copy_(variance * (0.5 + torch.rand(c, generator=gen)))
        bn.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
        bn.weight.copy_(variance ** 0.5 * torch.randn(c, generator=gen))
        bn.bias.copy_(torch.randn(c, generator=gen))


def unfused(module):
    twin = copy.deepcopy(module)
    twin.fused = False
    return twin


CONV_SHAPES = [(1, 1, 1), (3, 1, 1), (3, 2, 1), (3, 1, 2)]  # (kernel, stride, dilation)


@pytest.mark.parametrize("kernel,stride,dilation", CONV_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("mode", ["inference", "grad-enabled", "float64"])
@pytest.mark.parametrize("variance", [1e-4, 1.0])
def test_conv_bn_fused_matches_unfused(kernel, stride, dilation, relu, with_residual, mode, variance):
    """Inference takes oneDNN's fused epilogues on the CPU (float32), grad-enabled runs convolve with the fold
    inside the autograd graph, float64 takes the plain convolution."""
    gen = torch.Generator().manual_seed(kernel * 100 + stride * 10 + dilation)
    dtype = torch.float64 if mode == "float64" else torch.float32
    module = ConvBN(6, 5, kernel, stride, dilation, relu=relu, fused=True).eval()
    randomise_batch_norm(module.bn, gen, variance)
    x = torch.randn(2, 6, 9, 11, generator=gen)
    out_shape = unfused(module)(x).shape
    residual = torch.randn(out_shape, generator=gen) if with_residual else None

    def run(m, dt):
        m = m.to(dt)
        args = (x.to(dt),) if residual is None else (x.to(dt), residual.to(dt))
        if mode == "grad-enabled":
            return m(*args)
        with torch.no_grad():
            return m(*args)

    out = run(module, dtype)
    assert out.shape == out_shape and out.dtype == dtype
    exact = run(unfused(module), torch.float64)
    same_precision = run(unfused(module), dtype)
    assert_within_budget(out.detach(), exact.detach(), same_precision.detach(), ATOL[dtype],
                         f"ConvBN k{kernel} s{stride} d{dilation} relu={relu} residual={with_residual} {mode} "
                         f"variance {variance}")


def test_conv_bn_refolds_when_statistics_change():
    """The inference fold is cached: in-place updates of the statistics and of gamma must reach the output."""
    gen = torch.Generator().manual_seed(3)
    module = ConvBN(4, 6, 3, fused=True).eval()
    randomise_batch_norm(module.bn, gen, 1e-4)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    exact64 = lambda: unfused(module).double()(x.double())  # noqa: E731
    with torch.no_grad():
        for update in (lambda bn: bn.running_var.mul_(3), lambda bn: bn.running_mean.add_(0.5),
                       lambda bn: bn.weight.mul_(-2), lambda bn: bn.bias.sub_(1)):
            before = module(x)
            update(module.bn)
            after = module(x)
            assert not torch.equal(before, after), "the cached fold ignored an in-place update"
            assert_within_budget(after, exact64(), unfused(module)(x), ATOL[torch.float32], "refolded ConvBN")


# ---------------------------------------------------------------------------------------------------------------
# the CascadeFeatureFusion module

def cff_backends():
    cases = [pytest.param("reference", id="reference"),
             pytest.param("native", id="native",
                          marks=pytest.mark.skipif(not icnet_kernels.native_available(), reason="_C not built"))]
    if not torch.cuda.is_available():
        cases.append(pytest.param("triton", id="triton-interpreted", marks=pytest.mark.skipif(
            os.environ.get("TRITON_INTERPRET") != "1", reason="Triton is not interpreted here")))
    return cases


CFF_GEOMETRIES = {"shortcut": ((4, 5), (7, 9), 2, True), "general": ((4, 5), (6, 11), 1, False)}


def cff_module(backend, dilation, align_corners, variance, seed):
    gen = torch.Generator().manual_seed(seed)
    module = CascadeFeatureFusion(5, 3, 6, dilation=dilation, align_corners=align_corners, backend=backend)
    with torch.no_grad():
        module.conv_low.weight.copy_(torch.randn(module.conv_low.weight.shape, generator=gen) / 45 ** 0.5)
        module.conv_high.weight.copy_(torch.randn(module.conv_high.weight.shape, generator=gen) / 3 ** 0.5)
    randomise_batch_norm(module.bn_low, gen, variance)
    randomise_batch_norm(module.bn_high, gen, variance)
    return module.eval()


def composition(module, low, high):
    """The module's unfused meaning, from its own layers."""
    up = F.interpolate(low, size=high.shape[-2:], mode="bilinear", align_corners=module.align_corners)
    return torch.relu(module.bn_low(module.conv_low(up)) + module.bn_high(module.conv_high(high)))


@pytest.mark.parametrize("backend", cff_backends())
@pytest.mark.parametrize("geometry", CFF_GEOMETRIES)
@pytest.mark.parametrize("variance", [1e-4, 1.0])
@pytest.mark.parametrize("frozen_training", [False, True], ids=["eval", "frozen-bn-training"])
def test_cascade_feature_fusion_module_fused_matches_unfused(backend, geometry, variance, frozen_training):
    (h, w), (H, W), dilation, align_corners = CFF_GEOMETRIES[geometry]
    module = cff_module(backend, dilation, align_corners, variance, seed=7)
    if frozen_training:  # BatchNorm frozen inside a training module: still folded, now under autograd
        module.train()
        module.bn_low.eval()
        module.bn_high.eval()
    gen = torch.Generator().manual_seed(8)
    low, high = torch.randn(2, 5, h, w, generator=gen), torch.randn(2, 3, H, W, generator=gen)
    with torch.set_grad_enabled(frozen_training):
        out = module(low, high)
    with torch.no_grad():
        exact = composition(copy.deepcopy(module).double(), low.double(), high.double())
        same_precision = composition(module, low, high)
    assert_within_budget(out.detach(), exact, same_precision, ATOL[torch.float32],
                         f"CFF module {backend} {geometry} variance {variance}")


@pytest.mark.parametrize("backend", cff_backends())
def test_cascade_feature_fusion_module_refolds_when_statistics_change(backend):
    module = cff_module(backend, 2, True, 1e-4, seed=9)
    gen = torch.Generator().manual_seed(10)
    low, high = torch.randn(1, 5, 4, 5, generator=gen), torch.randn(1, 3, 7, 9, generator=gen)
    with torch.no_grad():
        for bn in (module.bn_low, module.bn_high):
            for update in (lambda b: b.running_var.mul_(3), lambda b: b.running_mean.add_(0.5),
                           lambda b: b.weight.mul_(-2), lambda b: b.bias.sub_(1)):
                before = module(low, high)
                update(bn)
                after = module(low, high)
                assert not torch.equal(before, after), "the cached fold ignored an in-place update"
                exact = composition(copy.deepcopy(module).double(), low.double(), high.double())
                assert_within_budget(after, exact, composition(module, low, high), ATOL[torch.float32],
                                     f"refolded CFF module {backend}")
