"""The Triton kernels' weight layouts: made once per weight, views included, and made again on any change."""

import torch

from icnet_kernels.triton.weight_layout import laid_out


class CountingTranspose:
    def __init__(self):
        self.calls = 0

    def __call__(self, t):
        self.calls += 1
        return t.t().contiguous()


def test_a_new_view_of_the_same_weight_finds_its_copy():
    weight, make = torch.randn(19, 128, 1, 1), CountingTranspose()
    with torch.inference_mode():
        first = laid_out(weight.flatten(1), "transposed", make)
        second = laid_out(weight.flatten(1), "transposed", make)
    assert make.calls == 1 and second is first and torch.equal(second, weight.flatten(1).t())


def test_views_of_other_geometry_get_copies_of_their_own():
    weight, make = torch.randn(6, 4), CountingTranspose()
    with torch.no_grad():
        top, bottom = laid_out(weight[:3], "transposed", make), laid_out(weight[3:], "transposed", make)
    assert make.calls == 2 and torch.equal(top, weight[:3].t()) and torch.equal(bottom, weight[3:].t())


def test_a_change_through_the_base_or_another_view_makes_the_copy_again():
    weight, make = torch.randn(19, 128, 1, 1), CountingTranspose()
    with torch.no_grad():
        laid_out(weight.flatten(1), "transposed", make)
        weight.mul_(2.0)
        after_base = laid_out(weight.flatten(1), "transposed", make)
        weight.view(19, 128)[0].zero_()
        after_view = laid_out(weight.flatten(1), "transposed", make)
    assert make.calls == 3 and torch.equal(after_view, weight.flatten(1).t())
    assert not torch.equal(after_base, after_view)


def test_inference_tensors_are_laid_out_on_every_call():
    with torch.inference_mode():
        weight, make = torch.randn(5, 3), CountingTranspose()
        laid_out(weight, "transposed", make)
        weight.add_(1.0)
        again = laid_out(weight, "transposed", make)
    assert make.calls == 2 and torch.equal(again, weight.t())
