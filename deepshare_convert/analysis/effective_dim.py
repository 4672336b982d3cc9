"""Effective dimension of binary gate vectors (paper Sec. 3.1, Fig. 2), accumulated in a stream.

At every spatial position of an activation site, the DReLU gates of its d channels form a
d-dimensional 0/1 vector per example.  If the gates of different channels were independent,
the covariance of these vectors over N examples would be close to diagonal and its
*effective dimension* ED = (sum lambda)^2 / sum lambda^2 (Del Giudice 2021) close to d;
channels that gate together pull it down (all identical: ED = 1).  A low ED/d is the
paper's argument that a few prototype gates can stand in for all of them.

The baseline shuffles spatial positions independently within each channel: every channel
keeps exactly the gates it had (its marginal), only *which* positions line up across
channels changes.  Correlation that survives the shuffle comes from the image as a whole
(a dark picture closes many gates everywhere); what the shuffle removes is tied to shared
positions, which is what sharing one gate per position exploits.

Memory is bounded: only per-position sums and outer products are kept (positions x d x d
float64), never the N x positions vectors.  Batches of 0/1 gates give integer sums, so the
per-batch products are exact in float32 and the running totals are float64.
"""

from __future__ import annotations

import math

import torch

__all__ = ["effective_dimension", "GateCovariance", "shuffle_positions"]


def effective_dimension(cov: torch.Tensor) -> torch.Tensor:
    """(..., d, d) covariance -> (...,) ED = (sum lambda)^2 / sum lambda^2, in float64.

    Eigenvalues come from ``eigvalsh`` (the matrix is symmetric); tiny negative ones from
    rounding are clipped to 0.  Where every channel is constant (all variance 0) the ED is
    undefined: NaN, which summaries skip.
    """
    lam = torch.linalg.eigvalsh(cov.double()).clamp_min(0.0)
    total, squares = lam.sum(-1), lam.square().sum(-1)
    return torch.where(squares > 0, total.square() / squares.clamp_min(1e-300), torch.full_like(total, math.nan))


class GateCovariance:
    """Running per-position sums of d-channel gate vectors and of their outer products."""

    def __init__(self, channels: int, positions: int):
        self.channels, self.positions = channels, positions
        self.count = 0
        self.sum = torch.zeros(positions, channels, dtype=torch.float64)
        self.outer = torch.zeros(positions, channels, channels, dtype=torch.float64)

    def add(self, gates: torch.Tensor) -> None:
        """Add a batch of gates shaped (B, C, positions) with values in {0, 1}."""
        # (positions, B, C), contiguous: a strided batch makes bmm ~10x slower when threads compete
        g = gates.to(torch.float32).permute(2, 0, 1).contiguous()
        self.sum += g.sum(1, dtype=torch.float64)
        self.outer += torch.bmm(g.transpose(1, 2), g).double()  # integer counts <= B: exact in float32
        self.count += gates.shape[0]

    def covariance(self) -> torch.Tensor:
        """(positions, d, d) covariance over the examples seen (population normalisation)."""
        n = max(self.count, 1)
        mean = self.sum / n
        return self.outer / n - mean.unsqueeze(-1) * mean.unsqueeze(-2)

    def normalised_ed(self) -> torch.Tensor:
        """ED / d at every position (NaN where all channels were constant)."""
        return effective_dimension(self.covariance()) / self.channels


def shuffle_positions(gates: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Permute the positions of every (example, channel) row of (B, C, positions) independently.

    Each row gets its channel's random permutation for this batch composed with a random
    cyclic shift of its own: a permutation per row (the marginal is kept exactly) drawn
    without sorting B*C*positions random keys, which would dominate the run time.
    """
    b, c, p = gates.shape
    perm = torch.argsort(torch.rand(c, p, generator=generator), dim=1)
    shift = torch.randint(p, (b, c, 1), generator=generator)
    index = perm.unsqueeze(0).expand(b, c, p).gather(2, (torch.arange(p) + shift) % p)
    return gates.gather(2, index)
