"""The activation registry: a kind registered once is found by the census, rewritten by
convert, masked by SNL and refused by the MPC lowering in one line -- no other file edited."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from deepshare_convert.activations import (
    RELU,
    ActivationKind,
    activation_kinds,
    get_activation,
    register_activation,
    unregister_activation,
)  # fmt: skip
from deepshare_convert.conversion.census import census
from deepshare_convert.errors import DeepShareError, PlanError


class ToyReLU(nn.Module):
    """A user's own ReLU: fx would trace through it to a clamp, which nothing counts."""

    def forward(self, x):
        return torch.clamp(x, min=0)


def toy_relu(x):
    return torch.clamp(x, min=0)


def _net() -> nn.Module:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.act1 = ToyReLU()
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Linear(8 * 4 * 4, 10)

        def forward(self, x):
            x = toy_relu(self.conv2(self.act1(self.conv1(x))))
            return self.head(x.flatten(1))

    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture
def toy_kind():
    kind = register_activation(ActivationKind("toy", modules=(ToyReLU,), functions=(toy_relu,)))
    yield kind
    unregister_activation("toy")


def test_relu_is_registered_once():
    assert RELU in activation_kinds() and get_activation("relu") is RELU
    with pytest.raises(PlanError, match="not registered"):
        get_activation("nope")


def test_unregistered_toy_is_invisible():
    assert census(_net(), (3, 4, 4)).total_relus == 0  # the clamp is not a site


def test_toy_kind_counted_converted_and_refused_by_mpc(toy_kind):
    from deepshare_convert.conversion.rewrite import convert
    from deepshare_convert.mpc.lowering import lower, prepare

    model = _net()
    c = census(model, (3, 4, 4))
    assert [(s.activation, s.kind, s.relus) for s in c.sites] == [("toy", "module", 128), ("toy", "function", 128)]

    # convert: at P = C every site becomes a shared gate and the output is unchanged
    conv = convert(model, (3, 4, 4), budget=256, group_size=1)
    assert conv.plan.achieved == 256 and census(conv.model, (3, 4, 4)).total_relus == 256
    x = torch.randn(5, 3, 4, 4)
    assert torch.allclose(conv.model(x), model(x), atol=1e-6)
    with pytest.raises(DeepShareError, match=r"activation 'toy' has no secure protocol here; convert the model"):
        lower(prepare(model), (1, 3, 4, 4))
    lower(prepare(conv.model), (1, 3, 4, 4))  # converted: gates run on shares


def test_kind_with_no_drelu_decomposition_is_counted_but_kept(toy_kind):
    from deepshare_convert.conversion.rewrite import convert
    from deepshare_convert.snl import mask_relus

    register_activation(ActivationKind("toy", modules=(ToyReLU,), functions=(toy_relu,), gate=None,
                                       comparisons_per_element=2))  # fmt: skip
    model = _net()
    c = census(model, (3, 4, 4))
    assert c.total_relus == 2 * 256  # two comparisons per element, counted in the census
    with pytest.raises(DeepShareError, match=r"activation sites \(toy\) have no x\*DReLU\(x\) form"):
        convert(model, (3, 4, 4), budget="50%")
    with pytest.raises(DeepShareError, match="SNL masks activations of the form"):
        mask_relus(model, (3, 4, 4))
    mixed = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ToyReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(128, 10)).eval()  # fmt: skip
    conv = convert(mixed, (3, 4, 4), budget=2 * 128 + 64, group_size=1)
    toy_site, relu_site = census(mixed, (3, 4, 4)).sites
    assert conv.plan.kept == [toy_site.name] and [g.sites for g in conv.plan.groups] == [[relu_site.name]]
    assert conv.plan.achieved == 2 * 128 + 64
