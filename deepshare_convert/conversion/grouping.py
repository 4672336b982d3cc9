"""Layer sharing: consecutive same-shape activation sites share one gate (paper Supp. C).

Sites are taken in topological order; a *run* is a maximal stretch of
consecutive sites with identical shape (C, H, W).  Runs are cut into groups of
at most ``group_size`` sites; the first site of a group is its *leader*, whose
input feeds the group's gate.  ``group_size=1`` disables layer sharing.
Sites the user keeps as plain ReLUs break runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import DeepShareError
from .census import ActivationSite

__all__ = ["Group", "GroupShape", "group_sites", "select_kept"]


class GroupShape:
    """Numbers derived from a group's ``sites`` and activation ``shape`` (C, H, W)."""

    sites: Sequence[str]
    shape: Sequence[int]

    @property
    def leader(self) -> str:
        return self.sites[0]

    @property
    def channels(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def spatial(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n

    @property
    def relus(self) -> int:
        """ReLUs the group's sites had before conversion."""
        return len(self.sites) * self.channels * self.spatial


@dataclass(frozen=True)
class Group(GroupShape):
    """Sites that share one gate; ``spatial`` is H*W (1 for (N, C) activations)."""

    index: int
    sites: tuple[str, ...]
    shape: tuple[int, ...]


def select_kept(sites: Sequence[ActivationSite], patterns: Iterable[str]) -> set[str]:
    """Names of sites matched by ``--keep`` (a site name, a module path, or a regex)."""
    kept: set[str] = set()
    for pattern in patterns:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise DeepShareError(f"--keep {pattern!r} is not a valid regular expression: {e}") from None
        hits = {s.name for s in sites if pattern in (s.name, s.module) or rx.fullmatch(s.name) or rx.fullmatch(s.module)}
        if not hits:
            raise DeepShareError(f"--keep {pattern!r} matches no activation site")
        kept |= hits
    return kept


def group_sites(sites: Sequence[ActivationSite], group_size: int = 2, kept: Iterable[str] = ()) -> list[Group]:
    """Cut runs of consecutive same-shape sites into groups of at most ``group_size``."""
    if group_size < 1:
        raise DeepShareError(f"--group-size must be at least 1, got {group_size}")
    kept = set(kept)
    groups: list[Group] = []
    run: list[ActivationSite] = []

    def flush():
        for start in range(0, len(run), group_size):
            chunk = run[start : start + group_size]
            groups.append(Group(len(groups), tuple(s.name for s in chunk), tuple(chunk[0].shape)))
        run.clear()

    for site in sites:
        if site.name in kept:
            flush()
            continue
        if run and tuple(run[-1].shape) != tuple(site.shape):
            flush()
        run.append(site)
    flush()
    return groups
