"""timm's published weights, fetched by timm itself -- offline-aware (used by ``timm:NAME --pretrained``
and by DeepLabV3's ``pretrained_backbone``).

The hub client retries an unreachable host for most of a minute, so the host is probed first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import WeightsError, first_line

__all__ = ["timm_pretrained"]


def timm_pretrained(timm, name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model(name, pretrained=True)``: timm's own download and cache.

    The hub client retries an unreachable host for most of a minute, so the host is probed
    first (3 s); offline, timm is pointed at its cached copy, or the error says so at once.
    """
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise WeightsError(f"timm publishes no pretrained weights for {name}; pass --weights FILE (a state dict)")
    overlay = None
    if not _timm_source_reachable(cfg):
        cached = _timm_cached_file(cfg)
        if cached is None:
            raise WeightsError(f"timm's pretrained weights for {name} are not in the local cache and the download "
                               "host cannot be reached (offline?); pass --weights FILE (a state dict) instead")  # fmt: skip
        overlay = {"file": cached, "source": ""}
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as e:  # noqa: BLE001 - network, cache or format errors of third-party code
        first = first_line(e, 160)
        raise WeightsError(f"cannot load timm's pretrained weights for {name}: {first}; "
                           "pass --weights FILE (a state dict) instead") from None  # fmt: skip


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _timm_source_reachable(cfg) -> bool:
    """Can the host timm would download from (the hub, or the weights URL) be reached in 3 s?"""
    import socket
    from urllib.parse import urlparse

    if _offline():
        return False
    if cfg.hf_hub_id:
        url = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    else:
        url = cfg.url or ""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy or url)
    if not target.hostname:
        return not url  # a local file needs no network
    try:
        socket.create_connection((target.hostname, target.port or (443 if target.scheme == "https" else 80)),
                                 timeout=3.0).close()  # fmt: skip
        return True
    except OSError:
        return False


def _timm_cached_file(cfg) -> str | None:
    """timm's weights already in the local cache (the hub's, or torch.hub's for URL weights)."""
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            path = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(path, str):
                return path
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if path.is_file():
            return str(path)
    return None
