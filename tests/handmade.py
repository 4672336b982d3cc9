"""Hand-made models that exercise every way a network can call ReLU (used by several tests)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class FunctionalReLUs(nn.Module):
    """F.relu, torch.relu, Tensor.relu, in-place variants, in one graph."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.c4 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = self.c3(x).relu()
        x = F.relu(self.c4(x), inplace=True)
        x = torch.relu_(x * 1.5)
        x = x.mean((2, 3))
        return self.fc(x).relu_()


class ReusedReLU(nn.Module):
    """One nn.ReLU instance called at three places (three sites)."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1, stride=2)
        self.fc = nn.Linear(6 * 4 * 4, 4)

    def forward(self, x):
        x = self.act(self.c1(x))
        x = self.act(self.c2(x))
        return self.act(self.fc(torch.flatten(x, 1)))


class ContainerReLUs(nn.Module):
    """ReLUs inside ModuleList and ModuleDict."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1) for i in range(3)])
        self.acts = nn.ModuleList([nn.ReLU() for _ in range(3)])
        self.heads = nn.ModuleDict({"a": nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 7), nn.ReLU()),
                                    "b": nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 3))})

    def forward(self, x):
        for conv, act in zip(self.convs, self.acts):
            x = act(conv(x))
        return self.heads["a"](x).sum(1, keepdim=True) + self.heads["b"](x)


class InplaceResidual(nn.Module):
    """An in-place ReLU right before a residual add, the classic aliasing trap."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.relu(self.bn(self.c1(x)))
        y = self.relu2(self.c2(y))
        return self.relu(y + x)


HANDMADE = {
    "functional": (FunctionalReLUs, (3, 8, 8)),
    "reused": (ReusedReLU, (3, 8, 8)),
    "containers": (ContainerReLUs, (3, 8, 8)),
    "inplace_residual": (InplaceResidual, (4, 8, 8)),
}


def hook_count_relus(model: nn.Module, input_size) -> int:
    """Independent count: run the model and add up every comparison its activations make.

    ReLU and LeakyReLU outputs count one comparison per element, ReLU6 / Hardtanh outputs two
    (x > lower bound, x < upper bound). Modules are counted with forward hooks; functional
    calls by wrapping torch's functions for the duration of one forward pass.
    """
    count = [0]

    def add(out, per=1):
        count[0] += out[0].numel() * per
        return out

    per_module = {nn.ReLU: 1, nn.LeakyReLU: 1, nn.Hardtanh: 2}  # nn.ReLU6 is an nn.Hardtanh
    hooks = [m.register_forward_hook(lambda m, i, o, per=per: add(o, per))
             for m in model.modules() for cls, per in per_module.items() if isinstance(m, cls)]  # fmt: skip
    functions = [(F, "relu", 1), (torch, "relu", 1), (torch, "relu_", 1), (torch.Tensor, "relu", 1),
                 (torch.Tensor, "relu_", 1), (F, "relu6", 2), (F, "hardtanh", 2), (F, "hardtanh_", 2),
                 (F, "leaky_relu", 1), (F, "leaky_relu_", 1)]  # fmt: skip
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in functions]
    depth = [0]  # F.relu calls torch.relu, nn.ReLU calls F.relu: count the outermost call only

    def wrap(fn, per):
        def inner(*a, **k):
            depth[0] += 1
            try:
                out = fn(*a, **k)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                add(out, per)
            return out

        return inner

    forwards = {cls: cls.forward for cls in per_module}

    def counted_by_hook(forward):
        def module_forward(self, x):  # counted by its hook
            depth[0] += 1
            try:
                return forward(self, x)
            finally:
                depth[0] -= 1

        return module_forward

    for (owner, name, per), (_, _, fn) in zip(functions, originals):
        setattr(owner, name, wrap(fn, per))
    for cls, forward in forwards.items():
        cls.forward = counted_by_hook(forward)
    try:
        with torch.no_grad():
            model.eval()(torch.randn(1, *input_size))
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
        for cls, forward in forwards.items():
            cls.forward = forward
        for h in hooks:
            h.remove()
    return count[0]
