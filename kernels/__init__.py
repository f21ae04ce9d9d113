"""Gaussian hot path of PNBA: one dispatch per fused operation (Triton on CUDA, torch otherwise).

    from kernels import fuse_sample_kl, match_loss, poe, gaussian_kl
"""

from __future__ import annotations

from .reference import fuse_sample_kl, gaussian_kl, match_loss, poe

__all__ = ["fuse_sample_kl", "gaussian_kl", "match_loss", "poe"]
