"""PNBA: probabilistic neural-behavioural representation alignment (Zhu et al., ICML 2025) in one file.

    model = PNBA(config.preset("demo").model, {"mouseA": 7440, "mouseB": 7928})
    out = model(responses, video, "mouseA")    # responses (B, T, N), video (B, 1, T, 32, 64)
    # config stimulus "behaviour" (NWB monkeys): model(spikes, velocity, "C-session1"), velocity (B, T, D)
    out.losses.total.backward()
    g = model.encode(responses=r)              # any N, e.g. an animal never trained on: g.mu_x (B, C, n, T)

Notation: x is the neural modality, y the stimulus (video, or behaviour such as hand velocity), p their
fusion (product of the two Gaussian experts). Every latent is in the published layout (B, C, n, T): C latent
channels, n latent "neuron" positions, T frames. The Gaussian maths (fusion, KL, matching) lives in
`kernels` (torch reference on CPU, fused Triton kernels on CUDA); the Poisson likelihood lives here.

Choices where the paper leaves room (config.ModelConfig):

- `neural_projector`: "conv" is the published projector (3-tap conv along the neuron index, then
  adaptive max-pool to `proj_neurons` bins). It treats the arbitrary neuron order as a spatial axis,
  so a new animal's latent depends on how its neurons happen to be numbered. "set" makes every
  (neuron, frame) a token from that neuron's own trace around the frame (a temporal conv shared by all
  neurons, optionally plus its normalised cortical coordinates) and lets `proj_neurons` learned query
  slots cross-attend over the tokens of each frame: permutation-invariant, no per-neuron or per-animal
  parameter, cost linear in N.
- `neural_readout`: "resize" is the published per-animal output stage: bicubic resize of the decoded
  neuron axis to N, then convolutions along it; neuron i is decoded from the bins near i * S / N, i.e. it
  assumes the neuron index means something. That holds for nothing with the "set" projector (slots have
  no relation to neuron indices), so "neuron" gives every neuron of every animal its own factorised
  linear readout (a weight per decoded slot and per feature channel, plus a bias) of shared decoder
  features: order-consistent (permute an animal's neurons and its readout rows together and nothing
  changes), each neuron learns its own tuning, and it costs a (B, r, T, N) map with r = 16 instead of
  (B, 128, N, T). Readouts are the only per-animal parameters; encoding never uses them.
- `video_to_neural`: the video latent (B, C, T, h, w) has h*w = 32 positions, the neural latent n = 4.
  "nearest" is the published F.interpolate(mode="nearest"): it keeps positions 0, 8, 16, 24 (the first
  column of each latent row) and drops the other 28, so 7/8 of the stimulus encoder's output never
  reaches the heads and gets no gradient. "pool" (default outside the paper preset) averages each
  group of h*w/n positions instead (with n = 4: each latent row). It uses all of them, and it is the
  least-squares inverse of the repeat upsampling that both options use to feed a latent to the video
  decoder (repeat(pool(v)) is the latent closest to v), where "nearest" trusts one column per row.

Memory (the aim: the paper's batch of 32 on one 80 GB GPU): the published model spends most of its
memory on the full-resolution neural output stage (128 channels x N neurons x T) run twice. Here every
GroupNorm-activation-conv unit stores only its input and recomputes the cheap normalised and activated
tensors in backward (`norm_act_conv`); the output stage runs one sample at a time, so its backward
transients are one sample's; attention goes through scaled_dot_product_attention (the published one
materialises B x 4096 x 4096); and `checkpointing=True` also recomputes the full-resolution stages
(neural projector, first encoder and last decoder level, output stage, full-resolution video levels).
The fused and cross-modal decodes share one batched pass of 2B, and video runs channels-last (oneDNN's
3-D convolutions are up to 2x faster on CPU in that layout).

Weights of the published model (github zhuyu-cs/PNBA) load with `convert_reference_state_dict` into the
`paper` preset: same layers, same parameter shapes, same means and log-variances.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import config
from config import ModelConfig
from kernels import fuse_sample_kl, match_loss, poe

POISSON_EPS = 1e-8  # as published: keeps log(rate) finite where ELU + 1 underflows to 0
# parameters that belong to one animal (the "neuron" readout): they see a gradient only on its steps
PER_ANIMAL_PARAMETERS = ("neural_readout.spatial.", "neural_readout.weight.", "neural_readout.bias.",
                         "neural_readout.latent.", "neural_readout.state.", "unit_embedding.")


# ----------------------------------------------------------------------------------------------- losses


def poisson_nll(rate, target, observed=None):
    """Poisson negative log-likelihood sum(rate - target * log(rate + 1e-8)) / B, dropping the
    log(target!) term, which does not depend on the model. rate, target (B, T, N) -> scalar. observed
    (B, T, N) bool, optional: only those elements count (a unit not recorded over a bin has no target)."""
    nll = rate - target * torch.log(rate + POISSON_EPS)
    if observed is not None:
        nll = torch.where(observed, nll, torch.zeros_like(nll))
    return nll.sum() / target.shape[0]


def poisson_floor(target):
    """Poisson NLL of predicting each neuron's mean over the batch's (B, T): what a model that ignores its
    input reaches. A Poisson loss stuck at this floor means collapse. target (B, T, N) -> scalar."""
    return poisson_nll(target.mean(dim=(0, 1), keepdim=True).expand_as(target), target)


def standard_normal_kl(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the latent: (B, D) each -> (B,). Without it nothing
    ties the latent's offset or scale down, and a trial-independent template can dominate it."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def squared_error(prediction, target):
    """sum((prediction - target)^2) / B."""
    return (prediction - target).pow(2).sum() / target.shape[0]


# ------------------------------------------------------------------------------------- building blocks


def group_norm(channels, max_groups=32):
    return nn.GroupNorm(min(max_groups, channels), channels, eps=1e-6)


def _norm_act(x, weight, bias, groups, act, keep, p, for_backward=False):
    """act(group_norm(x)) computed in at least float32 (as autocast does), dropout applied; for_backward
    also keeps the normalised tensor (LeakyReLU: the activated one) and its statistics."""
    B, C = x.shape[:2]
    dtype = torch.promote_types(x.dtype, torch.float32)
    normed, mean, rstd = torch.ops.aten.native_group_norm(
        x.to(dtype), weight.to(dtype), bias.to(dtype), B, C, x[0, 0].numel(), groups, 1e-6)
    # in place where nothing needs the input: LeakyReLU's backward needs only the sign, which it keeps
    a = F.silu(normed, inplace=not for_backward) if act == "silu" else F.leaky_relu_(normed)
    if keep is not None:
        a = a * keep / (1.0 - p)
    return a.to(x.dtype), normed, mean, rstd


class _NormActConv(torch.autograd.Function):
    """conv(dropout(act(group_norm(x)))) that keeps only x (and a dropout mask) for backward.

    Autograd would also keep the normalised and the activated tensors; at the full-resolution neural
    stages those two are most of the training memory. Backward recomputes them (elementwise, cheap) but
    not the convolution, and frees each as soon as it has been used.
    """

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, conv_weight, conv_bias, keep, groups, act, padding, p):
        a = _norm_act(x, norm_weight, norm_bias, groups, act, keep, p)[0]
        conv = F.conv3d if conv_weight.dim() == 5 else F.conv2d
        ctx.save_for_backward(x, norm_weight, norm_bias, conv_weight, keep)
        ctx.spec = (groups, act, padding, p)
        return conv(a, conv_weight, conv_bias, padding=padding)

    @staticmethod
    def backward(ctx, grad_y):
        x, norm_weight, norm_bias, conv_weight, keep = ctx.saved_tensors
        groups, act, padding, p = ctx.spec
        a, normed, mean, rstd = _norm_act(x, norm_weight, norm_bias, groups, act, keep, p, for_backward=True)
        dims = conv_weight.dim() - 2
        # only the gradients autograd asks for: a frozen model (adapt.py) needs grad_x alone
        need = ctx.needs_input_grad
        # the forward conv ran in grad_y's dtype (bf16 under autocast): use the same operands
        grad_a, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_y, a.to(grad_y.dtype), conv_weight.to(grad_y.dtype), [conv_weight.shape[0]],
            [1] * dims, list(padding), [1] * dims, False, [0] * dims, 1, [any(need[:3]), need[3], need[4]])
        del a
        grad_x = grad_nw = grad_nb = None
        if any(need[:3]):
            grad_a = grad_a.to(normed.dtype)
            if keep is not None:
                grad_a = grad_a * keep / (1.0 - p)
            grad_normed = (torch.ops.aten.silu_backward(grad_a, normed) if act == "silu"
                           else torch.ops.aten.leaky_relu_backward(grad_a, normed, 0.01, True))
            del grad_a, normed
            B, C = x.shape[:2]
            grad_x, grad_nw, grad_nb = torch.ops.aten.native_group_norm_backward(
                grad_normed, x.to(mean.dtype), mean, rstd, norm_weight.to(mean.dtype), B, C, x[0, 0].numel(),
                groups, list(need[:3]))

        def cast(grad, like):
            return None if grad is None else grad.to(like.dtype)
        return (cast(grad_x, x), cast(grad_nw, norm_weight), cast(grad_nb, norm_bias),
                cast(grad_w, conv_weight), cast(grad_b, conv_weight), None, None, None, None, None)


def norm_act_conv(x, norm, conv, act="silu", dropout=0.0, training=False):
    """conv(dropout(act(norm(x)))) for GroupNorm `norm` and a stride-1 Conv2d/Conv3d `conv`, storing only
    x for backward (see _NormActConv). act: "silu" or "leaky_relu" (slope 0.01)."""
    # GroupNorm's kernels need x dense in one of the two layouts, batch stride included
    layout = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    if not (x.is_contiguous() or x.is_contiguous(memory_format=layout) and x.stride(0) == x[0].numel()):
        x = x.contiguous()
    keep = torch.rand_like(x) >= dropout if training and dropout > 0 else None
    return _NormActConv.apply(x, norm.weight, norm.bias, conv.weight, conv.bias, keep, norm.num_groups, act,
                              conv.padding, dropout)


def maybe_checkpoint(enabled, fn, *args):
    """fn(*args); with `enabled`, its activations are recomputed in backward instead of stored."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class ResBlock(nn.Module):
    """x + conv2(drop(silu(gn2(conv1(silu(gn1(x))))))), 1x1 shortcut when the width changes; 2-D (kernel
    3x3, neural) or 3-D (kernel tk x 3 x 3, video) as the published ResnetBlock / ResnetBlock3d."""

    def __init__(self, in_channels, out_channels, dropout=0.0, kernel=(3, 3)):
        super().__init__()
        conv = nn.Conv3d if len(kernel) == 3 else nn.Conv2d
        padding = tuple(k // 2 for k in kernel)
        self.norm1 = group_norm(in_channels)
        self.conv1 = conv(in_channels, out_channels, kernel, padding=padding)
        self.norm2 = group_norm(out_channels)
        self.conv2 = conv(out_channels, out_channels, kernel, padding=padding)
        if in_channels != out_channels:
            self.nin_shortcut = conv(in_channels, out_channels, 1)
        self.dropout = dropout

    def forward(self, x):
        h = norm_act_conv(x, self.norm1, self.conv1)
        h = norm_act_conv(h, self.norm2, self.conv2, dropout=self.dropout, training=self.training)
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over all positions of a (B, C, *positions) map, through SDPA: no L x L
    matrix is stored. The published neural blocks add the input back; its video blocks do not."""

    def __init__(self, channels, residual=True, out_bias=False):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.proj_out = nn.Linear(channels, channels, bias=out_bias)
        self.residual = residual

    def forward(self, x):
        tokens = self.norm(x.flatten(2).transpose(1, 2))                  # (B, L, C)
        q, k, v = self.qkv(tokens).unsqueeze(1).chunk(3, dim=-1)          # (B, 1, L, C) each
        h = self.proj_out(F.scaled_dot_product_attention(q, k, v).squeeze(1))
        h = h.transpose(1, 2).reshape(x.shape)
        return x + h if self.residual else h


class Downsample(nn.Module):
    """x4 along the neuron axis: conv kernel (4, 1), stride (4, 1)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, (4, 1), stride=(4, 1))

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """x4 along the neuron axis (nearest), then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, size=(4 * x.shape[2], x.shape[3]), mode="nearest"))


def _mid_block(channels, dropout):
    mid = nn.Module()
    mid.block_1 = ResBlock(channels, channels, dropout)
    mid.attn_1 = SelfAttention(channels)
    mid.block_2 = ResBlock(channels, channels, dropout)
    return mid


def _run_mid(mid, h):
    return mid.block_2(mid.attn_1(mid.block_1(h)))


# ----------------------------------------------------------------------------------------- neural side


def normalise_coords(coords):
    """Cortical coordinates (N, 3) or (B, N, 3), any unit -> centred on the animal's centroid, unit RMS
    radius, so that animals with different fields of view and offsets are comparable."""
    centred = coords - coords.mean(dim=-2, keepdim=True)
    radius = centred.pow(2).sum(-1).mean(-1, keepdim=True).sqrt().unsqueeze(-1)
    return centred / radius.clamp_min(1e-6)


class NeuralProjector(nn.Module):
    """Responses of any number of neurons (B, T, N) -> (B, proj_channels, proj_neurons, T).

    Front end "conv" (published) or "set" (see the module docstring), then the published stack:
    GroupNorm, LeakyReLU, ResBlock, self-attention over proj_neurons * T positions, ResBlock, GroupNorm,
    LeakyReLU.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, S = cfg.proj_channels, cfg.proj_neurons
        self.kind, self.slots_n, self.heads = cfg.neural_projector, S, cfg.set_heads
        if self.kind == "conv":
            self.neuron_expand = nn.Conv2d(1, C, 3, padding=(0, 1))
        else:
            d, k = cfg.set_token_dim, cfg.temporal_kernel
            self.token_conv = nn.Conv1d(1, d, k, padding=k // 2)   # each neuron's trace around the frame
            self.token_mlp = nn.Linear(d, d)
            if cfg.use_coords:
                self.coord_embed = nn.Linear(3, d)
            self.token_norm = nn.LayerNorm(d)
            self.key_value = nn.Linear(d, 2 * d)
            self.slots = nn.Parameter(torch.randn(S, d))
            self.slot_out = nn.Linear(d, C)
        if cfg.state_input in ("encoder", "both"):
            # the recorded behavioural state of each frame, added to every slot: what the encoder needs to
            # tell a response change the state explains from one the stimulus does. Zero at the start (a
            # random projection of a private state swamped the neural signal before anything was learned)
            # and drawn from no random stream: the rest of the model initialises as it would without it
            self.state_embed = nn.Parameter(torch.zeros(cfg.state_dim, C))
        self.norm1 = group_norm(C)
        self.resblock1 = ResBlock(C, C, cfg.proj_dropout)
        self.atten = SelfAttention(C)
        self.resblock2 = ResBlock(C, C, cfg.proj_dropout)
        self.norm_out = group_norm(C)

    def _expand_and_pool(self, x):
        return F.adaptive_max_pool2d(self.neuron_expand(x), (self.slots_n, x.shape[-1]))

    def _slots_from_neurons(self, responses, coords, identity):
        B, T, N = responses.shape
        tokens = self.token_conv(responses.transpose(1, 2).reshape(B * N, 1, T))     # (B*N, d, T)
        tokens = self.token_mlp(F.gelu(tokens.view(B, N, -1, T).permute(0, 3, 1, 2)))  # (B, T, N, d)
        if coords is not None and hasattr(self, "coord_embed"):
            position = self.coord_embed(normalise_coords(coords.to(tokens.dtype)))   # (N, d) or (B, N, d)
            tokens = tokens + (position.unsqueeze(1) if position.dim() == 3 else position)
        if identity is not None:
            tokens = tokens + identity.to(tokens.dtype)                              # (N, d): unit i's own
        d = tokens.shape[-1]
        key, value = self.key_value(self.token_norm(tokens)).chunk(2, dim=-1)
        key, value = (t.reshape(B * T, N, self.heads, d // self.heads).transpose(1, 2) for t in (key, value))
        query = self.slots.view(self.slots_n, self.heads, -1).transpose(0, 1).expand(B * T, -1, -1, -1)
        slots = F.scaled_dot_product_attention(query, key, value)                     # (B*T, H, S, d/H)
        slots = slots.transpose(1, 2).reshape(B, T, self.slots_n, d)
        return self.slot_out(slots).permute(0, 3, 2, 1)                                 # (B, C, S, T)

    def forward(self, responses, coords=None, identity=None, state=None):
        """responses (B, T, N); coords (N, 3) or (B, N, 3); identity (N, set_token_dim), the units' learned
        embeddings (training animals); state (B, T, state_dim), the recorded behavioural state."""
        if self.kind == "conv":
            # always recomputed in backward: the 1-channel conv is nearly free, and it spares storing the
            # (B, C, N, T) map that max-pool's backward would keep
            x = maybe_checkpoint(True, self._expand_and_pool, responses.transpose(1, 2).unsqueeze(1))
        else:
            x = self._slots_from_neurons(responses, coords, identity)
        if state is not None and hasattr(self, "state_embed"):
            x = x + (state.to(x.dtype) @ self.state_embed).transpose(1, 2).unsqueeze(2)   # (B, C, 1, T)
        x = F.leaky_relu(self.norm1(x))
        x = self.resblock2(self.atten(self.resblock1(x)))
        return F.leaky_relu(self.norm_out(x))


class NeuralEncoder(nn.Module):
    """(B, proj_channels, S, T) -> (B, z_channels, S / 4^(levels - 1), T): VQGAN-style levels of ResBlocks
    with x4 downsampling of the neuron axis between them, then ResBlock-attention-ResBlock."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ch, block_in = cfg.base_channel, cfg.base_channel
        self.checkpointing = cfg.checkpointing
        self.conv_in = nn.Conv2d(cfg.proj_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResBlock(block_in, ch * mult, cfg.dropout))
                block_in = ch * mult
            if level < len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = _mid_block(block_in, cfg.dropout)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def _level(self, level, h):
        stage = self.down[level]
        for block in stage.block:
            h = block(h)
        return stage.downsample(h) if hasattr(stage, "downsample") else h

    def _first_stage(self, x):
        return self._level(0, self.conv_in(x))

    def forward(self, x):
        h = maybe_checkpoint(self.checkpointing, self._first_stage, x)
        for level in range(1, len(self.down)):
            h = self._level(level, h)
        return self.conv_out(F.silu(self.norm_out(_run_mid(self.mid, h))))


class NeuralDecoder(nn.Module):
    """(B, z_channels, n, T) -> (B, proj_channels, n * 4^(levels - 1), T); mirror of NeuralEncoder with
    num_res_blocks + 1 ResBlocks per level and, as published, twice the encoder's width."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ch = 2 * cfg.base_channel
        block_in = ch * cfg.ch_mult[-1]
        self.checkpointing = cfg.checkpointing
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _mid_block(block_in, cfg.dropout)
        self.up = nn.ModuleList()
        for level in reversed(range(len(cfg.ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResBlock(block_in, ch * cfg.ch_mult[level], cfg.dropout))
                block_in = ch * cfg.ch_mult[level]
            if level != 0:
                stage.upsample = Upsample(block_in)
            self.up.insert(0, stage)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.proj_channels, 3, padding=1)

    def _level(self, level, h):
        stage = self.up[level]
        for block in stage.block:
            h = block(h)
        return stage.upsample(h) if hasattr(stage, "upsample") else h

    def _last_stage(self, h):
        return self.conv_out(F.silu(self.norm_out(self._level(0, h))))

    def forward(self, z):
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(range(1, len(self.up))):
            h = self._level(level, h)
        return maybe_checkpoint(self.checkpointing, self._last_stage, h)


def state_weights(cfg: ModelConfig, neuron_counts: dict[str, int]) -> nn.ParameterDict:
    """Per animal, a (state_dim, N) weight of the recorded behavioural state (B, T, state_dim) in each
    neuron's drive before the output nonlinearity, zero at the start. Near ELU + 1's floor the rate is about
    exp(drive), so the state acts as a gain, as running and arousal do in V1; the Sensorium 2023 models feed
    behaviour to their readouts in the same spirit. Then no latent has to carry the state."""
    return nn.ParameterDict({m: nn.Parameter(torch.zeros(cfg.state_dim, n))
                             for m, n in neuron_counts.items()})


class ResizeReadout(nn.Module):
    """Published output stage: (B, C, S, T) -> rate (B, T, N). Bicubic resize of the neuron axis S -> N,
    two ResBlocks, conv, GN-LeakyReLU-conv to C/2, GN-LeakyReLU-1x1 conv to one channel, ELU + 1.
    Per animal only through N (no per-animal parameters), unless the state feeds the readout
    (state_input), whose per-neuron weights are per animal."""

    def __init__(self, cfg: ModelConfig, neuron_counts: dict[str, int]):
        super().__init__()
        if cfg.state_input in ("readout", "both"):
            self.state = state_weights(cfg, neuron_counts)
        C = cfg.proj_channels
        self.checkpointing = cfg.checkpointing
        self.resblock1 = ResBlock(C, C, cfg.proj_dropout)
        self.resblock2 = ResBlock(C, C, cfg.proj_dropout)
        self.process1 = nn.Conv2d(C, C, 3, padding=1)
        self.norm1 = group_norm(C, max_groups=8)
        self.process2 = nn.Conv2d(C, C // 2, 3, padding=1)
        self.norm2 = group_norm(C // 2, max_groups=8)
        self.out = nn.Conv2d(C // 2, 1, 1)

    def _one_sample(self, h, neurons):
        h = F.interpolate(h, size=(neurons, h.shape[-1]), mode="bicubic")
        h = self.process1(self.resblock2(self.resblock1(h)))
        h = norm_act_conv(h, self.norm1, self.process2, act="leaky_relu")
        return norm_act_conv(h, self.norm2, self.out, act="leaky_relu").squeeze(1).transpose(1, 2)

    def forward(self, h, mouse, neurons, state=None):
        # one sample at a time: backward's transient full-resolution gradients are then one sample's, and
        # with checkpointing only one sample's activations are ever rebuilt at once
        drive = torch.cat([maybe_checkpoint(self.checkpointing, self._one_sample, h[i:i + 1], neurons)
                           for i in range(len(h))])
        if state is not None and hasattr(self, "state"):
            drive = drive + state.to(drive.dtype) @ self.state[mouse]
        return F.elu(drive) + 1


class NeuronReadout(nn.Module):
    """Per-neuron factorised readout: (B, C, S, T) -> rate (B, T, N).

    Shared: GN, LeakyReLU, 1x1 conv to r = readout_channels features g (B, r, S, T). Neuron i of animal
    m: rate = ELU(sum_{c,s} weight[m][i, c] * spatial[m][i, s] * g[c, s, t] + bias[m][i]) + 1.
    With latent_readout, the drive also holds sum_k latent[m][k, i] * z[k, t], a linear read of the frame's
    latent (C * n numbers): a direct path from the latent to every neuron, so that the latent has to carry
    what the neurons respond to and the deep decoder only adds what is not linear (README "Objective").
    """

    def __init__(self, cfg: ModelConfig, neuron_counts: dict[str, int]):
        super().__init__()
        C, S, r = cfg.proj_channels, cfg.proj_neurons, cfg.readout_channels
        self.norm = group_norm(C, max_groups=8)
        self.features = nn.Conv2d(C, r, 1)
        self.spatial = nn.ParameterDict({m: nn.Parameter(torch.randn(n, S) / math.sqrt(S))
                                         for m, n in neuron_counts.items()})
        self.weight = nn.ParameterDict({m: nn.Parameter(torch.randn(n, r) / math.sqrt(r))
                                        for m, n in neuron_counts.items()})
        self.bias = nn.ParameterDict({m: nn.Parameter(torch.zeros(n)) for m, n in neuron_counts.items()})
        if cfg.latent_readout:
            latent = cfg.z_channels * (cfg.proj_neurons // 4 ** (len(cfg.ch_mult) - 1))
            self.latent = nn.ParameterDict({m: nn.Parameter(torch.zeros(latent, n))
                                            for m, n in neuron_counts.items()})
        if cfg.state_input in ("readout", "both"):
            self.state = state_weights(cfg, neuron_counts)

    @torch.no_grad()
    def init_bias(self, mouse, mean_rate):
        """Start neuron i of `mouse` at its own mean rate (N,): bias = (ELU + 1)^-1(mean). With a zero bias
        every neuron starts at rate 1, and Adam moves a bias by about lr per step (a quarter of the steps
        with four animals), so a neuron whose mean is 0.01 would need a drive of -4.6 it never reaches."""
        rate = torch.as_tensor(mean_rate, dtype=torch.float32).clamp_min(1e-3)
        self.bias[mouse].copy_(torch.where(rate >= 1, rate - 1, rate.log()))

    def forward(self, h, mouse, neurons, z=None, state=None):
        return self.read(self.shared(h), mouse, z, state)

    def shared(self, h):
        """The features every animal's readout reads: (B, C, S, T) -> (B, r, S, T). Frame by frame from here
        on, so read() takes any frames of them, e.g. cached ones (adapt.py: a new animal's readout fit)."""
        return self.features(F.leaky_relu(self.norm(h)))

    def read(self, g, mouse, z=None, state=None):
        """Rate (B, T, N) of animal `mouse` from shared(h) (B, r, S, T), the latent z (B, C, n, T) and the
        state (B, T, state_dim): ELU(drive) + 1."""
        return F.elu(self.drive(g, mouse, z, state)) + 1

    def drive(self, g, mouse, z=None, state=None):
        """The drive (B, T, N) before the output nonlinearity; the state's part is added last."""
        per_neuron = g.transpose(2, 3) @ self.spatial[mouse].t()          # (B, r, T, N)
        drive = torch.einsum("brtn,nr->btn", per_neuron, self.weight[mouse]) + self.bias[mouse]
        if z is not None and hasattr(self, "latent"):
            drive = drive + z.permute(0, 3, 1, 2).flatten(2) @ self.latent[mouse]   # (B, T, C*n) @ (C*n, N)
        if state is not None and hasattr(self, "state"):
            drive = drive + state.to(drive.dtype) @ self.state[mouse]               # (B, T, S) @ (S, N)
        return drive


# ------------------------------------------------------------------------------------------ video side


class SpatialDownsample(nn.Module):
    """x2 in height and width (conv 1x3x3, stride (1, 2, 2)), GN, SiLU."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.norm = group_norm(out_channels)

    def forward(self, x):
        return F.silu(self.norm(self.conv(x)))


class VideoUpsample(nn.Module):
    """x2 in height and width (nearest), then a per-frame 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        B, C, T, H, W = x.shape
        frames = x.transpose(1, 2).reshape(B * T, C, H, W).contiguous(memory_format=torch.channels_last)
        frames = self.conv(F.interpolate(frames, scale_factor=2.0, mode="nearest"))
        return frames.view(B, T, C, 2 * H, 2 * W).transpose(1, 2)     # channels-last 3-D again


class VideoEncoder(nn.Module):
    """Video (B, 1, T, H, W) -> (B, video_features[-1], T, H / 2^(L-1), W / 2^(L-1)): 3-D conv ResNet,
    video_blocks[i] ResBlocks then a stride-2 spatial downsampling per level, then ResBlock, spatio-temporal
    attention (no residual, as published), ResBlock, conv."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        f, kernel = cfg.video_features, (cfg.temporal_kernel, 3, 3)
        self.checkpointing, self.first_level = cfg.checkpointing, cfg.video_blocks[0] + 1
        self.stem = nn.Conv3d(1, f[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for i in range(len(f) - 1):
            self.blocks.extend(ResBlock(f[i], f[i], kernel=kernel) for _ in range(cfg.video_blocks[i]))
            self.blocks.append(SpatialDownsample(f[i], f[i + 1]))
        self.final_blocks = nn.ModuleList([ResBlock(f[-1], f[-1], kernel=kernel),
                                           SelfAttention(f[-1], residual=cfg.video_attention_residual,
                                                         out_bias=True),
                                           ResBlock(f[-1], f[-1], kernel=kernel)])
        self.final_conv = nn.Conv3d(f[-1], f[-1], 3, padding=1)

    def _full_resolution(self, x):
        x = self.stem(x)
        for block in self.blocks[:self.first_level]:
            x = block(x)
        return x

    def forward(self, x):
        # channels-last: oneDNN's 3-D convolutions run up to 2x faster on CPU in this layout
        x = maybe_checkpoint(self.checkpointing, self._full_resolution,
                             x.contiguous(memory_format=torch.channels_last_3d))
        for block in [*self.blocks[self.first_level:], *self.final_blocks]:
            x = block(x)
        return self.final_conv(x)


class VideoDecoder(nn.Module):
    """Latent (B, z_channels, T, h, w) -> video (B, 1, T, H, W) in [0, 1]. Mirror of VideoEncoder with
    features and block counts reversed; as published, the first ResBlock of a level changes the width,
    and the decoder does not use video_blocks[0] (nor the encoder video_blocks[-1])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        f, blocks, kernel = cfg.video_features[::-1], cfg.video_blocks[::-1], (cfg.temporal_kernel, 3, 3)
        self.checkpointing, self.last_level = cfg.checkpointing, blocks[-2] + 1
        self.initial_conv = nn.Conv3d(f[0], f[0], 3, padding=1)
        self.initial_blocks = nn.ModuleList([ResBlock(f[0], f[0], kernel=kernel),
                                             SelfAttention(f[0], residual=cfg.video_attention_residual,
                                                           out_bias=True),
                                             ResBlock(f[0], f[0], kernel=kernel)])
        self.blocks = nn.ModuleList()
        for i in range(len(f) - 1):
            self.blocks.append(VideoUpsample(f[i]))
            self.blocks.extend(ResBlock(f[i] if j == 0 else f[i + 1], f[i + 1], kernel=kernel)
                               for j in range(blocks[i]))
        self.final_conv = nn.Conv3d(f[-1], 1, 3, padding=1)

    def _full_resolution(self, x):
        for block in self.blocks[-self.last_level:]:
            x = block(x)
        return self.final_conv(x).clamp(0, 1)

    def forward(self, z):
        x = self.initial_conv(z.contiguous(memory_format=torch.channels_last_3d))   # see VideoEncoder
        for block in [*self.initial_blocks, *self.blocks[:-self.last_level]]:
            x = block(x)
        return maybe_checkpoint(self.checkpointing, self._full_resolution, x)


# -------------------------------------------------------------------------------------- behaviour side


class BehaviourEncoder(nn.Module):
    """Behaviour (B, T, D), e.g. hand velocity -> (B, z_channels, n, T): a temporal ResNet over the frames
    (kernel temporal_kernel, no downsampling: the latent keeps every frame), self-attention over the
    frames, then GN, SiLU and a 1x1 conv to z_channels * n channels, unfolded into the latent's n
    positions."""

    def __init__(self, cfg: ModelConfig, latent_neurons: int):
        super().__init__()
        ch, kernel = cfg.behaviour_channels, (1, cfg.temporal_kernel)
        self.conv_in = nn.Conv2d(cfg.behaviour_dim, ch, kernel, padding=(0, kernel[1] // 2))
        self.blocks = nn.ModuleList(ResBlock(ch, ch, cfg.dropout, kernel)
                                    for _ in range(cfg.behaviour_blocks))
        self.atten = SelfAttention(ch)
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.z_channels * latent_neurons, 1)
        self.latent_shape = (cfg.z_channels, latent_neurons)

    def forward(self, behaviour):
        h = self.conv_in(behaviour.transpose(1, 2).unsqueeze(2))            # (B, ch, 1, T)
        for block in self.blocks:
            h = block(h)
        h = self.conv_out(F.silu(self.norm_out(self.atten(h))))              # (B, C * n, 1, T)
        return h.view(len(h), *self.latent_shape, h.shape[-1])


class BehaviourDecoder(nn.Module):
    """Latent (B, z_channels, n, T) -> behaviour (B, T, D): the mirror of BehaviourEncoder (the n positions
    folded into channels, a 1x1 conv, attention over the frames, a temporal ResNet, GN, SiLU, conv to D)."""

    def __init__(self, cfg: ModelConfig, latent_neurons: int):
        super().__init__()
        ch, kernel = cfg.behaviour_channels, (1, cfg.temporal_kernel)
        self.conv_in = nn.Conv2d(cfg.z_channels * latent_neurons, ch, 1)
        self.atten = SelfAttention(ch)
        self.blocks = nn.ModuleList(ResBlock(ch, ch, cfg.dropout, kernel)
                                    for _ in range(cfg.behaviour_blocks))
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.behaviour_dim, kernel, padding=(0, kernel[1] // 2))

    def forward(self, z):
        h = self.atten(self.conv_in(z.flatten(1, 2).unsqueeze(2)))          # (B, ch, 1, T)
        for block in self.blocks:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h))).squeeze(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------- model


class Gaussians(NamedTuple):
    """Means and log-variances, each (B, C, n, T): x neural, y stimulus (video or behaviour), p fused (the
    single modality's when the other is absent); None for an absent modality."""
    mu_x: torch.Tensor | None
    logvar_x: torch.Tensor | None
    mu_y: torch.Tensor | None
    logvar_y: torch.Tensor | None
    mu_p: torch.Tensor
    logvar_p: torch.Tensor


class Losses(NamedTuple):
    """Each term summed over its elements and divided by the batch size; total = weighted sum."""
    poisson: torch.Tensor        # responses from the fused sample
    poisson_cross: torch.Tensor  # responses from the stimulus sample (cross-modal encoding)
    stimulus: torch.Tensor       # squared error of the stimulus (video or behaviour) from the fused sample
    stimulus_cross: torch.Tensor # ... from the neural sample (cross-modal decoding)
    kl_fusion: torch.Tensor      # KL(p||x) + KL(p||y)
    kl_cross: torch.Tensor       # KL(x||y) + KL(y||x)
    kl_prior: torch.Tensor       # KL(x||N(0, I)) + KL(y||N(0, I)) (not published; weight 0 in "paper")
    match: torch.Tensor          # probabilistic matching BCE over the batch
    total: torch.Tensor


class Output(NamedTuple):
    losses: Losses
    rate: torch.Tensor           # (B, T, N) Poisson rate from the fused sample
    rate_cross: torch.Tensor     # (B, T, N) from the stimulus sample
    stimulus_rec: torch.Tensor   # (B, 1, T, H, W) video or (B, T, D) behaviour from the fused sample
    stimulus_cross: torch.Tensor # ... from the neural sample
    gaussians: Gaussians


def _check_model_config(cfg: ModelConfig, neuron_counts):
    """Raise ValueError naming the first model setting the architecture cannot be built with. The settings
    themselves (choices, ranges, the rules between them) are checked in one place, config.validate_model;
    what depends on the animals is checked here."""
    config.validate_model(cfg)
    rules = [
        (len(neuron_counts) > 0 and all(int(n) >= 3 for n in neuron_counts.values()),
         "neuron_counts must name at least one animal, each with at least 3 neurons"),
        (all(isinstance(m, str) and m and "." not in m for m in neuron_counts),
         "animal names must be non-empty strings without '.'"),
    ]
    for ok, message in rules:
        if not ok:
            raise ValueError(message)


class PNBA(nn.Module):
    """The PNBA model. neuron_counts: {animal name: number of neurons}, fixed at construction (only the
    decoder is per animal); kept in `self.neuron_counts` for checkpoints (not in the state_dict, so that
    published weights load strictly)."""

    def __init__(self, cfg: ModelConfig, neuron_counts: dict[str, int]):
        super().__init__()
        _check_model_config(cfg, neuron_counts)
        self.cfg = cfg
        self.neuron_counts = {m: int(n) for m, n in neuron_counts.items()}
        self.latent_neurons = cfg.proj_neurons // 4 ** (len(cfg.ch_mult) - 1)
        z, dropout = cfg.z_channels, cfg.dropout
        self.neural_projector = NeuralProjector(cfg)
        if cfg.unit_embedding:
            # what is known about each unit of a training animal beyond its activity, learned; a new animal
            # has none and is encoded by the identity-free path that identity_dropout keeps trained
            self.unit_embedding = nn.ParameterDict({m: nn.Parameter(torch.zeros(n, cfg.set_token_dim))
                                                    for m, n in self.neuron_counts.items()})
        self.neural_encoder = NeuralEncoder(cfg)
        if cfg.stimulus == "video":
            self.video_encoder = VideoEncoder(cfg)
        else:
            self.behaviour_encoder = BehaviourEncoder(cfg, self.latent_neurons)
        self.mu_x_head, self.logvar_x_head = ResBlock(z, z, dropout), ResBlock(z, z, dropout)
        self.mu_y_head, self.logvar_y_head = ResBlock(z, z, dropout), ResBlock(z, z, dropout)
        if cfg.mean_norm == "batch":
            # BN-VAE (Zhu et al. 2020): every element of mu, frame of the window included, has zero mean
            # and unit spread over the batch's windows, so no trial-independent template (zero padding
            # makes one along the window's frames) can dominate the latent, and the KL and matching terms
            # see trial differences on the scale of the variances (see README, Objective)
            self.mu_x_norm = nn.LazyBatchNorm1d(affine=False)
            self.mu_y_norm = nn.LazyBatchNorm1d(affine=False)
        self.neural_decoder = NeuralDecoder(cfg)
        self.neural_readout = (ResizeReadout(cfg, self.neuron_counts) if cfg.neural_readout == "resize"
                               else NeuronReadout(cfg, self.neuron_counts))
        if cfg.stimulus == "video":
            self.video_decoder = VideoDecoder(cfg)
        else:
            self.behaviour_decoder = BehaviourDecoder(cfg, self.latent_neurons)
        # a of the matching logits -a d + b. d sums over all C*n*T latent dimensions, so a = 1 (published)
        # starts every logit near -D and only the pull-together term acts; see config match_scale_init
        self.match_scale = nn.Parameter(torch.tensor(float(cfg.match_scale_init)))
        self.match_bias = nn.Parameter(torch.tensor(0.0))    # b

    # -- latent layout ---------------------------------------------------------------------------------

    def _video_to_neural(self, v):
        """(B, C, T, h, w) video latent -> (B, C, n, T)."""
        positions = v.flatten(3).transpose(2, 3)                              # (B, C, h*w, T)
        size = (self.latent_neurons, positions.shape[-1])
        if self.cfg.video_to_neural == "nearest":
            return F.interpolate(positions, size=size, mode="nearest")
        return F.adaptive_avg_pool2d(positions, size)

    @staticmethod
    def _neural_to_video(z, latent_hw):
        """(B, C, n, T) -> (B, C, T, h, w), each latent position repeated over its group of h*w/n."""
        B, C, _, T = z.shape
        z = F.interpolate(z, size=(latent_hw[0] * latent_hw[1], T), mode="nearest")
        return z.transpose(2, 3).reshape(B, C, T, *latent_hw)

    # -- encoding --------------------------------------------------------------------------------------

    def materialise(self, frames: int) -> None:
        """Give mean_norm="batch"'s BatchNorms their size for windows of `frames` frames, without touching
        their statistics: DDP and checkpoints need every buffer to exist before the first forward."""
        for name in ("mu_x_norm", "mu_y_norm"):
            norm = getattr(self, name, None)
            if norm is not None and norm.has_uninitialized_params():
                was_training = norm.training
                norm.eval()
                norm(torch.zeros(1, self.cfg.z_channels * self.latent_neurons * frames))
                norm.train(was_training)

    def _normalised_mean(self, mu, norm, stats=None):
        """mu (B, C, n, T) through BatchNorm over the windows per (latent element, frame), if configured:
        batch statistics in training, `stats` (mean, var), each (C, n, T), in evaluation when given, else
        the running statistics."""
        if not hasattr(self, norm):
            return mu
        if stats is not None and not self.training:
            mean, var = stats
            return (mu - mean) * torch.rsqrt(var + getattr(self, norm).eps)
        return getattr(self, norm)(mu.flatten(1)).view_as(mu)

    def add_animal(self, name: str, n_neurons: int, mean_rate=None, generator=None) -> list[str]:
        """Give a built model the per-animal parameters (PER_ANIMAL_PARAMETERS) of an animal it was not built
        for, initialised as a training animal's are: readout weights random (drawn from `generator`, or
        torch's), latent and state weights 0, unit embeddings 0 (so that it is encoded exactly as the
        identity-free path encodes it, zero-shot, until they are fitted); the bias at mean_rate (N,) when
        given and the readout is "neuron". Nothing shared changes. Returns the new parameters' names."""
        n = int(n_neurons)
        if name in self.neuron_counts:
            raise ValueError(f"animal {name!r} is already one the model was built for")
        _check_model_config(self.cfg, {name: n})
        ref = self.match_scale
        new = {}

        def param(module, key, shape, scale=None):
            value = torch.zeros(shape, device=ref.device, dtype=ref.dtype)
            if scale is not None:
                value = torch.randn(shape, generator=generator, dtype=ref.dtype).to(ref.device) * scale
            getattr(module, key)[name] = nn.Parameter(value)
            new[f"{key}.{name}"] = module

        readout, c = self.neural_readout, self.cfg
        if isinstance(readout, NeuronReadout):
            param(readout, "spatial", (n, c.proj_neurons), 1 / math.sqrt(c.proj_neurons))
            param(readout, "weight", (n, c.readout_channels), 1 / math.sqrt(c.readout_channels))
            param(readout, "bias", (n,))
            if hasattr(readout, "latent"):
                param(readout, "latent", (self.cfg.z_channels * self.latent_neurons, n))
        if hasattr(readout, "state"):
            param(readout, "state", (c.state_dim, n))
        if hasattr(self, "unit_embedding"):
            param(self, "unit_embedding", (n, c.set_token_dim))
        self.neuron_counts[name] = n
        if mean_rate is not None and isinstance(readout, NeuronReadout):
            readout.init_bias(name, mean_rate)
        return [("" if module is self else "neural_readout.") + key for key, module in new.items()]

    def identity(self, animal):
        """The unit embeddings (N, set_token_dim) of a training animal; None for an animal the model was not
        trained on, or without unit_embedding: the identity-free path."""
        if animal is None or not hasattr(self, "unit_embedding") or animal not in self.unit_embedding:
            return None
        return self.unit_embedding[animal]

    def _neural_head(self, responses, coords, identity=None, state=None):
        h = self.neural_encoder(maybe_checkpoint(self.cfg.checkpointing, self.neural_projector,
                                                 responses, coords, identity, state))
        return self.mu_x_head(h), self.logvar_x_head(h)

    @torch.no_grad()
    def neural_statistics(self, windows, coords=None, states=None, animal=None):
        """Mean and variance over all `windows` (an iterable of (W, T, N) responses of one animal; states: the
        matching (W, T, state_dim) states, if the model reads them) of the neural mean before mean_norm
        "batch": (mean, var), each (C, n, T); None without mean_norm. animal: a training animal's name, so
        that its unit embeddings are used as in encode().

        In training every batch holds one animal, so BatchNorm standardises mu_x with that animal's own
        statistics; its running statistics average over animals, and an animal's offset from that average
        is never penalised, so it drifts. Evaluation therefore standardises each animal with its own
        statistics too (encode(..., x_stats=...)): unsupervised, so a new animal's come from its own
        responses, and extraction stays per trial and deterministic."""
        if self.cfg.mean_norm != "batch":
            return None
        was_training = self.training
        self.train(False)
        total = total_sq = None
        count = 0
        identity = self.identity(animal)
        try:
            states = itertools.repeat(None) if states is None else states
            for responses, state in zip(windows, states, strict=False):
                mu = self._neural_head(responses, coords, identity, state)[0].double()
                total = mu.sum(0) if total is None else total + mu.sum(0)
                total_sq = mu.pow(2).sum(0) if total_sq is None else total_sq + mu.pow(2).sum(0)
                count += len(mu)
        finally:
            self.train(was_training)
        if count == 0:
            raise ValueError("neural_statistics needs at least one window")
        mean = total / count
        return mean.float(), (total_sq / count - mean.pow(2)).clamp_min(0).float()

    def _stimulus_features(self, stimulus):
        """Video (B, 1, T, H, W) or behaviour (B, T, D) -> (B, C, n, T), the input of the y heads."""
        if self.cfg.stimulus == "video":
            return self._video_to_neural(self.video_encoder(stimulus))
        return self.behaviour_encoder(stimulus)

    def _encode_modalities(self, responses, stimulus, coords, x_stats=None, identity=None, state=None):
        mu_x = logvar_x = mu_y = logvar_y = None
        if responses is not None:
            mu_x, logvar_x = self._neural_head(responses, coords, identity, state)
            mu_x = self._normalised_mean(mu_x, "mu_x_norm", x_stats)
        if stimulus is not None:
            v = self._stimulus_features(stimulus)
            mu_y, logvar_y = self._normalised_mean(self.mu_y_head(v), "mu_y_norm"), self.logvar_y_head(v)
        return mu_x, logvar_x, mu_y, logvar_y

    def encode(self, responses=None, stimulus=None, coords=None, x_stats=None, state=None,
               animal=None) -> Gaussians:
        """Distribution parameters, no sampling and no dropout (deterministic in train and eval mode).

        responses (B, T, N) with any N (a new animal needs no retraining), stimulus: video (B, 1, T, H, W)
        or behaviour (B, T, D) as the config's `stimulus` says, coords (N, 3) or (B, N, 3) cortical
        positions (used by the "set" projector with use_coords). Either modality may be None. x_stats: the
        animal's neural_statistics, for mean_norm "batch" (without them the running statistics are used,
        which do not fit any one animal exactly). state (B, T, state_dim): the recorded behavioural state
        (state_input "encoder" or "both"). animal: the name of a training animal, whose unit embeddings
        are then used (unit_embedding); any other animal is encoded identity-free (zero-shot).
        """
        if responses is None and stimulus is None:
            raise ValueError("encode needs responses, a stimulus or both")
        was_training = self.training
        self.train(False)
        try:
            mu_x, logvar_x, mu_y, logvar_y = self._encode_modalities(responses, stimulus, coords, x_stats,
                                                                     self.identity(animal), state)
        finally:
            self.train(was_training)
        if mu_x is None:
            return Gaussians(None, None, mu_y, logvar_y, mu_y, logvar_y)
        if mu_y is None:
            return Gaussians(mu_x, logvar_x, None, None, mu_x, logvar_x)
        return Gaussians(mu_x, logvar_x, mu_y, logvar_y, *fuse(mu_x, logvar_x, mu_y, logvar_y))

    # -- decoding --------------------------------------------------------------------------------------

    def neurons_of(self, mouse):
        if mouse not in self.neuron_counts:
            raise ValueError(f"mouse {mouse!r} is not one the model was built for; "
                             f"known: {', '.join(self.neuron_counts)}")
        return self.neuron_counts[mouse]

    def decode_responses(self, z, mouse, state=None):
        """Latent (B, C, n, T) -> Poisson rate (B, T, N) of animal `mouse`; state (B, T, state_dim): its
        recorded behavioural state, read by the readout with state_input "readout" or "both"."""
        if self.cfg.neural_readout == "resize":
            return self.neural_readout(self.neural_decoder(z), mouse, self.neurons_of(mouse), state)
        return self.neural_readout(self.neural_decoder(z), mouse, self.neurons_of(mouse), z, state)

    def decode_stimulus(self, z, shape):
        """Latent (B, C, n, T) -> video (B, 1, T, H, W) with (H, W) = shape[-2:], or behaviour (B, T, D)."""
        if self.cfg.stimulus == "behaviour":
            return self.behaviour_decoder(z)
        shrink = 2 ** (len(self.cfg.video_features) - 1)
        return self.video_decoder(self._neural_to_video(z, (shape[-2] // shrink, shape[-1] // shrink)))

    # -- training --------------------------------------------------------------------------------------

    def _what_the_encoder_sees(self, responses, coords, identity):
        """In training: with unit_dropout p the neural encoder sees a random subset of the animal's neurons
        (each left out with probability p, the same for the whole batch, at least 3 kept; the decoders and
        losses still see them all): an encoder that cannot count on any one neuron has to read population
        statistics, which is all it has for an animal it never saw (README, Monkeys). With identity_dropout
        q the batch's unit embeddings are hidden with probability q, and so, independently, are its
        coordinates: the identity-free path, a new animal's, stays trained."""
        if not self.training:
            return responses, coords, identity
        q = self.cfg.identity_dropout
        if q > 0 and identity is not None and torch.rand(()) < q:
            identity = None
        if q > 0 and coords is not None and self.cfg.use_coords and torch.rand(()) < q:
            coords = None
        p = self.cfg.unit_dropout
        if p == 0:
            return responses, coords, identity
        N = responses.shape[-1]
        keep = torch.rand(N, device=responses.device) >= p
        if keep.sum() < 3:
            keep[torch.randperm(N, device=responses.device)[:3]] = True
        return (responses[..., keep], None if coords is None else coords[..., keep, :],
                None if identity is None else identity[keep])

    def forward(self, responses, stimulus, mouse, coords=None, align_scale: float = 1.0,
                observed=None, state=None) -> Output:
        """responses (B, T, N) of animal `mouse`, stimulus: video (B, 1, T, H, W) or behaviour (B, T, D) ->
        Output (losses, reconstructions, Gaussians). observed (B, T, N) bool, optional: the Poisson terms
        count only those elements (NWB units not recorded over a bin). state (B, T, state_dim): the recorded
        behavioural state (config state_input). Training mode draws reparameterised samples; eval mode uses
        the means (deterministic)."""
        neurons = self.neurons_of(mouse)
        if responses.shape[-1] != neurons:
            raise ValueError(f"responses have {responses.shape[-1]} neurons; mouse {mouse!r} has {neurons}")
        seen, seen_coords, identity = self._what_the_encoder_sees(responses, coords, self.identity(mouse))
        mu_x, logvar_x, mu_y, logvar_y = self._encode_modalities(seen, stimulus, seen_coords, None, identity,
                                                                 state)
        B, latent_shape = mu_x.shape[0], mu_x.shape
        flat = [t.reshape(B, -1) for t in (mu_x, logvar_x, mu_y, logvar_y)]
        backend = self.cfg.kernels
        # training: the kernel draws the noise (in-kernel on Triton); eval: zero noise, i.e. the means
        noise = () if self.training else (torch.zeros_like(flat[0]),) * 3
        mu_p, logvar_p, z_p, z_x, z_y, kl_px, kl_py, kl_sym = fuse_sample_kl(*flat, *noise, backend=backend)

        # fused and cross-modal decodes as one batch of 2B each
        state2 = None if state is None else torch.cat([state, state])
        rate, rate_cross = self.decode_responses(torch.cat([z_p, z_y]).view(2 * B, *latent_shape[1:]), mouse,
                                                 state2).chunk(2)
        stimulus_rec, stimulus_cross = self.decode_stimulus(
            torch.cat([z_p, z_x]).view(2 * B, *latent_shape[1:]), stimulus.shape).chunk(2)

        c = self.cfg
        terms = dict(
            poisson=poisson_nll(rate, responses, observed),
            poisson_cross=poisson_nll(rate_cross, responses, observed),
            stimulus=squared_error(stimulus_rec, stimulus),
            stimulus_cross=squared_error(stimulus_cross, stimulus),
            kl_fusion=(kl_px + kl_py).sum() / B,
            kl_cross=kl_sym.sum() / B,
            kl_prior=(standard_normal_kl(flat[0], flat[1]) + standard_normal_kl(flat[2], flat[3])).sum() / B,
            match=match_loss(flat[2], flat[3], flat[0], flat[1], self.match_scale, self.match_bias,
                             backend=backend) / B,
        )
        # align_scale ramps the alignment terms in during warm-up (train.py); 1 = the published objective
        scale = {name: align_scale for name in ("kl_fusion", "kl_cross", "match", "kl_prior")}
        total = sum(getattr(c, f"w_{name}") * scale.get(name, 1.0) * value for name, value in terms.items())
        gaussians = Gaussians(mu_x, logvar_x, mu_y, logvar_y, mu_p.view(latent_shape),
                              logvar_p.view(latent_shape))
        return Output(Losses(**terms, total=total), rate, rate_cross, stimulus_rec, stimulus_cross, gaussians)


# ------------------------------------------------------------------------------ published weights


_REFERENCE_PREFIXES = {
    "in_projectors.": "neural_projector.",
    "encoder.": "neural_encoder.",
    "ca_embed_mean.": "mu_x_head.",
    "ca_embed_logvar.": "logvar_x_head.",
    "video_encoder.": "video_encoder.",
    "video_embed_mean.": "mu_y_head.",
    "video_embed_log_var.": "logvar_y_head.",
    "decoder.": "neural_decoder.",
    "output_projectors.": "neural_readout.",
    "video_decoder.": "video_decoder.",
}
_REFERENCE_SCALARS = {"a": "match_scale", "b": "match_bias"}


def convert_reference_state_dict(sd: dict) -> dict:
    """State dict of the published model (github zhuyu-cs/PNBA; plain, DataParallel/DDP "module."-prefixed
    or an mmcv checkpoint holding "state_dict") -> one that loads strictly into PNBA(paper preset with
    video_to_neural="nearest"). The published per-mouse output modules are parameter-free resizes, so
    nothing here depends on the animals."""
    sd = sd.get("state_dict", sd)
    converted = {}
    for name, value in sd.items():
        name = name.removeprefix("module.")
        if name in _REFERENCE_SCALARS:
            converted[_REFERENCE_SCALARS[name]] = value
            continue
        prefix = next((p for p in _REFERENCE_PREFIXES if name.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"{name!r} is not a parameter of the published PNBA model")
        ours = _REFERENCE_PREFIXES[prefix] + name[len(prefix):]
        # the published video attention names its output projection `proj`
        ours = re.sub(r"^(video_(?:en|de)coder\.(?:final|initial)_blocks\.1\.)proj\.", r"\1proj_out.", ours)
        converted[ours] = value
    return converted


# ---------------------------------------------------------------------------- checkpoints and metrics


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the data it is used with."""


def save_checkpoint(path, checkpoint: dict):
    """torch.save through config.atomic_path (temp file beside `path`, flushed to disk, then renamed over
    it): a crash, a kill or a full disk never leaves half a file, and the previous `path` stays whole until
    the new one is complete. An OSError (ENOSPC, EIO) propagates after the temp file is removed."""
    with config.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
    with contextlib.suppress(OSError):          # the rename itself survives a power cut
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path) -> dict:
    """A checkpoint dict (weights_only load, tensors on CPU) holding at least model, config and
    neuron_counts; anything else raises CheckpointError with one line naming the file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    missing = [k for k in ("model", "config", "neuron_counts") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a PNBA checkpoint (no {', '.join(missing)})")
    return ckpt


def load_weights(model, ckpt: dict, source) -> None:
    """model.load_state_dict(ckpt["model"]); a CheckpointError naming source if the weights do not fit the
    model built from the checkpoint's own config (a config edited after training, say)."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CheckpointError(f"{source}: its weights do not fit its config ({lines[-1]})") from None


def check_mice(ckpt: dict, neuron_counts: dict[str, int], source):
    """Refuse data whose animals have other neuron counts than the checkpoint recorded for them (animals
    the checkpoint does not know are fine: they are encoded zero-shot)."""
    recorded = {**ckpt.get("mice", {}), **ckpt["neuron_counts"]}
    for mouse, n in neuron_counts.items():
        if mouse in recorded and int(recorded[mouse]) != int(n):
            raise CheckpointError(f"{source}: mouse {mouse!r} has {n} neurons in the data but "
                                  f"{recorded[mouse]} neurons in the checkpoint")


def fuse(mu_x, logvar_x, mu_y, logvar_y):
    """The product of the neural and the stimulus Gaussians, each (B, C, n, T): (mu_p, logvar_p), same
    shape."""
    B = mu_x.shape[0]
    mu_p, logvar_p = poe(*(t.reshape(B, -1) for t in (mu_x, logvar_x, mu_y, logvar_y)))
    return mu_p.view_as(mu_x), logvar_p.view_as(mu_x)


def per_frame(latent, keep):
    """Window latents (W, C, n, T) -> (frames, C * n) float32 numpy, one row per frame of the trial: the
    windows' frames in order, those where keep (W * T,) is True (each valid frame once)."""
    return latent.float().permute(0, 3, 1, 2).flatten(2).flatten(0, 1)[keep].cpu().numpy()


def between_trial_corr(mu):
    """Mean Pearson r between the latents of different windows in a batch: (B, ...) -> float.

    Near 1 means a trial-independent template dominates the latents: collapse, or a template over a
    small trial-specific part (the centred statistics of stats_zeroshot.py tell which).
    """
    flat = mu.detach().float().flatten(1)
    if flat.shape[0] < 2:
        return float("nan")
    r = torch.corrcoef(flat)
    off = ~torch.eye(len(r), dtype=torch.bool, device=r.device)
    return float(r[off].nanmean())
