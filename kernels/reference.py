"""Plain-torch reference of the Gaussian hot path: the maths of record and the CPU path.

All inputs are flattened per sample: (B, D). Log-variances, never variances, are passed around so
that fusion stays in log space.
"""

from __future__ import annotations

import torch


def poe(mu_x, logvar_x, mu_y, logvar_y):
    """Product of two Gaussian experts. (B, D) each -> mu_p, logvar_p (B, D).

    var_p = var_x var_y / (var_x + var_y)  ->  logvar_p = lx + ly - logaddexp(lx, ly)
    mu_p = (mu_x var_y + mu_y var_x) / (var_x + var_y) = mu_x sigmoid(ly - lx) + mu_y sigmoid(lx - ly)
    """
    logvar_p = logvar_x + logvar_y - torch.logaddexp(logvar_x, logvar_y)
    mu_p = mu_x * torch.sigmoid(logvar_y - logvar_x) + mu_y * torch.sigmoid(logvar_x - logvar_y)
    return mu_p, logvar_p


def gaussian_kl(mu_q, logvar_q, mu_r, logvar_r):
    """KL(N(mu_q, var_q) || N(mu_r, var_r)) summed over D. (B, D) each -> (B,)."""
    return 0.5 * torch.sum(
        logvar_r - logvar_q + torch.exp(logvar_q - logvar_r)
        + (mu_q - mu_r) ** 2 * torch.exp(-logvar_r) - 1.0, dim=-1)


def fuse_sample_kl(mu_x, logvar_x, mu_y, logvar_y, eps_p, eps_x, eps_y):
    """Fusion, reparameterised samples and the KL terms of PNBA in one call. (B, D) each.

    Returns mu_p, logvar_p, z_p, z_x, z_y (B, D) and kl_px = KL(p||x), kl_py = KL(p||y),
    kl_sym = KL(x||y) + KL(y||x) (B,).
    """
    mu_p, logvar_p = poe(mu_x, logvar_x, mu_y, logvar_y)
    z_p = mu_p + torch.exp(0.5 * logvar_p) * eps_p
    z_x = mu_x + torch.exp(0.5 * logvar_x) * eps_x
    z_y = mu_y + torch.exp(0.5 * logvar_y) * eps_y
    kl_px = gaussian_kl(mu_p, logvar_p, mu_x, logvar_x)
    kl_py = gaussian_kl(mu_p, logvar_p, mu_y, logvar_y)
    kl_sym = gaussian_kl(mu_x, logvar_x, mu_y, logvar_y) + gaussian_kl(mu_y, logvar_y, mu_x, logvar_x)
    return mu_p, logvar_p, z_p, z_x, z_y, kl_px, kl_py, kl_sym


def match_loss(mu_y, logvar_y, mu_x, logvar_x, a, b):
    """Probabilistic matching: sum_ij BCE-with-logits(-a d_ij + b, [i == j]). (B, D) each, a, b scalars.

    d_ij = ||mu_y_i - mu_x_j||^2 + sum(var_y_i) + sum(var_x_j). The squared distance is expanded
    (|u|^2 + |v|^2 - 2 u.v) so no (B, B, D) tensor is formed.
    """
    sq_y = (mu_y * mu_y).sum(-1) + torch.exp(logvar_y).sum(-1)
    sq_x = (mu_x * mu_x).sum(-1) + torch.exp(logvar_x).sum(-1)
    d = (sq_y[:, None] + sq_x[None, :] - 2.0 * mu_y @ mu_x.T).clamp_min(0.0)
    logits = -a * d + b
    labels = torch.eye(mu_y.shape[0], dtype=logits.dtype, device=logits.device)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
