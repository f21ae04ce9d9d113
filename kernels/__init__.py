"""Gaussian hot path of PNBA: one dispatch per fused operation (Triton on CUDA, torch otherwise).

    from kernels import fuse_sample_kl, match_loss, poe, gaussian_kl
    *_, z_p, z_x, z_y, kl_px, kl_py, kl_sym = fuse_sample_kl(mu_x, lv_x, mu_y, lv_y, backend=cfg.kernels)
    loss = match_loss(mu_y, lv_y, mu_x, lv_x, a, b, backend=cfg.kernels)

Backend choice: an explicit `backend="triton"|"torch"` wins; `"auto"` (the default, and the config default)
defers to the environment variable PNBA_KERNELS=auto|triton|torch, and auto picks Triton for CUDA tensors
and torch for everything else. The Triton path runs on CPU tensors only under TRITON_INTERPRET=1 (set before
triton is imported), which is how the tests run it. Triton is imported on first use only.
"""

from __future__ import annotations

import os

import torch

from . import reference
from .reference import gaussian_kl, poe

__all__ = ["fuse_sample_kl", "gaussian_kl", "match_loss", "poe", "resolve_backend"]

BACKENDS = ("auto", "triton", "torch")


def _triton():
    from . import gaussian, matching  # deferred: importing triton costs time and reads TRITON_INTERPRET

    return gaussian, matching


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """"triton" or "torch" for an operation on tensors like x; see the module docstring for the order."""
    if backend not in BACKENDS:
        raise ValueError(f"kernels backend {backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        backend = os.environ.get("PNBA_KERNELS", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"PNBA_KERNELS={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    if backend == "triton" and not x.is_cuda and not _triton()[0].INTERPRETED:
        raise RuntimeError("the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                           f"imported to run on {x.device.type} tensors")
    return backend


def _check(name, *ts):
    t0 = ts[0]
    for t in ts:
        if t.dim() != 2 or t.shape != t0.shape or t.dtype != t0.dtype or t.device != t0.device:
            raise ValueError(f"{name}: every input must be (B, D) with one shape, dtype and device; got "
                             + ", ".join(f"{tuple(t.shape)} {t.dtype} {t.device}" for t in ts))


def fuse_sample_kl(mu_x, logvar_x, mu_y, logvar_y, eps_p=None, eps_x=None, eps_y=None, *, seed=None,
                   backend="auto"):
    """Fusion, reparameterised samples and KL terms (kernel A). (B, D) each.

    Returns mu_p, logvar_p, z_p, z_x, z_y (B, D) and KL(p||x), KL(p||y), KL(x||y) + KL(y||x) (B,).
    Noise: eps_p, eps_x, eps_y (B, D) when given (all three), else drawn from N(0, 1): on the Triton path
    in-kernel by Philox from `seed` (int or int tensor; None draws one from torch's generator), on the
    torch path by torch.randn (from a generator seeded with `seed`, if given); the two streams differ.
    The noise is a constant to autograd. The Triton path returns the KLs in fp32 (fp64 for fp64 inputs).
    """
    noise = (eps_p, eps_x, eps_y)
    if any(e is None for e in noise) and not all(e is None for e in noise):
        raise ValueError("fuse_sample_kl: give all of eps_p, eps_x, eps_y, or none of them")
    _check("fuse_sample_kl", mu_x, logvar_x, mu_y, logvar_y, *(e for e in noise if e is not None))
    if resolve_backend(backend, mu_x) == "torch":
        if eps_p is None:
            gen = None if seed is None else torch.Generator(mu_x.device).manual_seed(int(seed))
            eps_p, eps_x, eps_y = (torch.randn(mu_x.shape, generator=gen, dtype=mu_x.dtype,
                                               device=mu_x.device) for _ in range(3))
        return reference.fuse_sample_kl(mu_x, logvar_x, mu_y, logvar_y, eps_p, eps_x, eps_y)
    if eps_p is not None:
        seed = None
    elif seed is None:
        seed = torch.randint(2**62, (1,), device=mu_x.device)
    else:
        seed = torch.as_tensor(seed, dtype=torch.int64, device=mu_x.device).reshape(1)
    *outs, kl = _triton()[0].FuseSampleKL.apply(mu_x, logvar_x, mu_y, logvar_y, eps_p, eps_x, eps_y, seed)
    return (*outs, *kl.unbind(0))


def match_loss(mu_y, logvar_y, mu_x, logvar_x, a, b, *, backend="auto"):
    """Probabilistic matching loss (kernel B): sum_ij BCE-with-logits(-a d_ij + b, [i == j]). (B, D) each;
    a, b scalars (floats or one-element tensors, differentiable). Returns a 0-dim tensor."""
    _check("match_loss", mu_y, logvar_y, mu_x, logvar_x)
    if resolve_backend(backend, mu_y) == "torch":
        return reference.match_loss(mu_y, logvar_y, mu_x, logvar_x, a, b)
    a, b = (torch.as_tensor(v, device=mu_y.device) for v in (a, b))
    if a.numel() != 1 or b.numel() != 1:
        raise ValueError(f"match_loss: a and b must be scalars; got {tuple(a.shape)}, {tuple(b.shape)}")
    return _triton()[1].MatchLoss.apply(mu_y, logvar_y, mu_x, logvar_x, a, b)
