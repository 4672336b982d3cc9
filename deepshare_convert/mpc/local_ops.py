"""The MPC ops that need no communication: arithmetic with public values, reshapes, slicing,
padding, concatenation, pooling and resampling by public coefficients.

Each party applies them to its own share; they are a mixin of
:class:`~.executor.CrypTenInterpreter` (which dispatches ``_h_<handler>``), kept apart so the
interpreter holds only what talks to the other party.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import DeepShareError
from . import protocols as P
from .cost_rules import interpolate_args
from .resample import adaptive_pool_matrices, avg_pool_matrices, interpolate_matrices

__all__ = ["LocalOps", "is_shared"]


def is_shared(v: Any) -> bool:
    return type(v).__name__ == "ArithmeticSharedTensor"


def _integral(v: Any) -> bool:
    """A public integer (Python or tensor): CrypTen multiplies shares by it without encoding or truncating."""
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, torch.Tensor) and not v.is_floating_point())


def _times_public(x, v: Any):
    """``x · v`` for a public ``v``: an integer as CrypTen does it, anything else on the coefficient grid."""
    return x.mul(v) if _integral(v) else P.public_mul(x, v)


class LocalOps:
    """Handlers of the local ops; the interpreter provides ``self.mods`` (the graph's modules)."""

    mods: dict

    def _h_add(self, n, args, kwargs):
        a, b = args[0], args[1] if len(args) > 1 else kwargs["other"]
        if kwargs.get("alpha", 1) != 1:
            b = _times_public(b, kwargs["alpha"]) if is_shared(b) else b * kwargs["alpha"]
        return a + b if is_shared(a) else b + a

    def _h_sub(self, n, args, kwargs):
        a, b = args[0], args[1] if len(args) > 1 else kwargs["other"]
        return a - b if is_shared(a) else (-b) + a

    def _h_mul(self, n, args, kwargs):
        a, b = args[0], args[1] if len(args) > 1 else kwargs["other"]
        if not is_shared(a):
            a, b = b, a
        return a.mul(b) if is_shared(b) else _times_public(a, b)

    def _h_div(self, n, args, kwargs):
        if kwargs.get("rounding_mode") is not None:
            raise DeepShareError(f"cannot run node {n.name!r} under MPC: division with rounding_mode")
        x, d = args[0], args[1]
        if isinstance(d, float) and d.is_integer():
            d = int(d)
        if is_shared(d) or _integral(d):  # by an integer: CrypTen's local truncation
            return x.div(d)
        return P.public_mul(x, 1.0 / torch.as_tensor(d, dtype=torch.float64))

    def _h_neg(self, n, args, kwargs):
        return -args[0]

    def _h_identity(self, n, args, kwargs):
        return args[0]

    def _h_shape(self, n, args, kwargs):
        x = args[0]
        if n.op == "call_function":  # getattr(x, "shape")
            if args[1] not in ("shape",):
                raise DeepShareError(f"cannot run node {n.name!r} under MPC: attribute {args[1]!r} of a shared tensor")
            return x.size()
        return getattr(x, n.target)(*args[1:], **kwargs)

    def _h_flatten(self, n, args, kwargs):
        if n.op == "call_module":
            m = self.mods[n.target]
            return args[0].flatten(m.start_dim, m.end_dim)
        return args[0].flatten(*args[1:], **kwargs)

    def _h_reshape(self, n, args, kwargs):
        shape = tuple(args[1:]) if len(args) > 2 else (args[1] if len(args) > 1 else kwargs.get("shape"))
        if isinstance(shape, int):
            shape = (shape,)
        return args[0].reshape(*shape)

    def _h_shape_op(self, n, args, kwargs):
        return getattr(args[0], n.target)(*args[1:], **kwargs)

    def _h_getitem(self, n, args, kwargs):
        return args[0][args[1]]

    def _h_slice(self, n, args, kwargs):
        """``aten.slice(x, dim, start, end, step)``: basic indexing, local to each party."""
        names = ("dim", "start", "end", "step")
        v = {"dim": 0, "start": None, "end": None, "step": 1, **dict(zip(names, args[1:])), **kwargs}
        index = (slice(None),) * (v["dim"] % args[0].dim()) + (slice(v["start"], v["end"], v["step"]),)
        return args[0][index]

    def _h_pad(self, n, args, kwargs):
        pad = args[1] if len(args) > 1 else kwargs["pad"]
        mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
        value = args[3] if len(args) > 3 else kwargs.get("value", 0)
        if mode != "constant":
            raise DeepShareError(f"cannot run node {n.name!r} under MPC: F.pad mode {mode!r}")
        return args[0].pad(tuple(pad), value=0 if value is None else value)

    def _h_cat(self, n, args, kwargs):
        tensors = list(args[0])
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if not all(is_shared(t) for t in tensors):
            raise DeepShareError(f"cannot run node {n.name!r} under MPC: cat of shared and public tensors")
        scale = tensors[0].encoder.scale
        if any(t.encoder.scale != scale for t in tensors):
            raise DeepShareError(f"node {n.name!r}: cat of tensors with different fixed-point scales")
        out = tensors[0].shallow_copy()
        out.share = torch.cat([t.share for t in tensors], dim=dim)
        return out

    def _h_avgpool(self, n, args, kwargs):
        x = args[0]
        if n.op == "call_module":
            m = self.mods[n.target]
            k, s, p, ceil, incl, div = m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override
        else:
            names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
            v = dict(zip(names, args[1:]), **kwargs)
            k, s, p = v["kernel_size"], v.get("stride"), v.get("padding", 0)
            ceil, incl, div = v.get("ceil_mode", False), v.get("count_include_pad", True), v.get("divisor_override")
        if div is not None:
            raise DeepShareError(f"cannot run node {n.name!r} under MPC: avg-pool with divisor_override")
        if ceil or (not incl and p not in (0, (0, 0), [0, 0])):  # uneven windows: a public separable map, local
            return P.public_separable(x, *avg_pool_matrices(tuple(x.size()[-2:]), k, s, p, ceil, incl))
        return x.avg_pool2d(k, stride=s if s else None, padding=p)

    def _h_adaptive_avgpool(self, n, args, kwargs):
        x = args[0]
        size = self.mods[n.target].output_size if n.op == "call_module" else (args[1] if len(args) > 1 else kwargs["output_size"])
        size = (size, size) if isinstance(size, int) or size is None else tuple(size)
        h, w = x.size(2), x.size(3)
        oh, ow = (h if size[0] is None else size[0]), (w if size[1] is None else size[1])
        if (oh, ow) == (1, 1):
            return x.sum(dim=(2, 3), keepdim=True).div(h * w)
        if h % oh or w % ow:  # uneven bins: a public separable map (mpc/resample.py), local
            return P.public_separable(x, *adaptive_pool_matrices((h, w), (oh, ow)))
        return x.avg_pool2d((h // oh, w // ow))

    def _h_interpolate(self, n, args, kwargs):
        """Bilinear / bicubic / nearest resampling: public separable coefficients, local to each party."""
        x = args[0]
        r = interpolate_args(n, self.mods)
        out_hw = tuple(n.meta["tensor_meta"].shape[-2:])  # static: shapes were propagated by the lowering
        mats = interpolate_matrices(tuple(x.size()[-2:]), out_hw, r["mode"], r["align_corners"],
                                    r["scale_factor"], r["recompute_scale_factor"])  # fmt: skip
        return P.public_separable(x, *mats)

    def _h_mean(self, n, args, kwargs):
        x = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        if dim is None:
            return x.sum().div(x.nelement())
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        count = 1
        for d in dims:
            count *= x.size(d)
        return x.sum(dim=dims, keepdim=keep).div(count)

    def _h_sum(self, n, args, kwargs):
        return args[0].sum(*args[1:], **kwargs)
