"""Tests of pnba.py: losses against closed forms, shapes, modes, zero-shot encoding, checkpoints, the
published weights, and the order-invariant projector. `pytest test_model.py` (-m "not slow": < 60 s)."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import config
import pnba
from kernels import fuse_sample_kl, match_loss

COUNTS = {"m1": 40, "m2": 23}


def build(preset="tiny", counts=COUNTS, seed=0, **model_fields):
    cfg = config.preset(preset).model
    for name, value in model_fields.items():
        setattr(cfg, name, value)
    torch.manual_seed(seed)
    return pnba.PNBA(cfg, counts)


def batch(B=3, T=8, N=40, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, T, N, generator=g, dtype=dtype) * 3,
            torch.rand(B, 1, T, 32, 64, generator=g, dtype=dtype))


# ------------------------------------------------------------------------------------------- losses


def test_every_loss_term_equals_its_closed_form():
    weights = dict(w_poisson=0.7, w_poisson_cross=1.3, w_video=0.4, w_video_cross=2.0, w_kl_fusion=0.9,
                   w_kl_cross=1.1, w_match=0.6)
    model = build(**weights).double().eval()
    with torch.no_grad():
        model.match_scale.fill_(0.01)
        model.match_bias.fill_(0.3)
    r, v = batch(dtype=torch.float64)
    out = model(r, v, "m1")
    B = r.shape[0]
    mu_x, logvar_x, mu_y, logvar_y = (t.reshape(B, -1) for t in out.gaussians[:4])
    var_x, var_y = logvar_x.exp(), logvar_y.exp()

    var_p = var_x * var_y / (var_x + var_y)
    mu_p = (mu_x * var_y + mu_y * var_x) / (var_x + var_y)
    torch.testing.assert_close(out.gaussians.mu_p.reshape(B, -1), mu_p)
    torch.testing.assert_close(out.gaussians.logvar_p.reshape(B, -1), var_p.log())

    def kl(m_q, v_q, m_r, v_r):
        return 0.5 * (torch.log(v_r / v_q) + (v_q + (m_q - m_r) ** 2) / v_r - 1).sum(-1)

    a, b = model.match_scale.item(), model.match_bias.item()
    match = 0.0
    for i in range(B):
        for j in range(B):
            d = ((mu_y[i] - mu_x[j]) ** 2).sum().item() + var_y[i].sum().item() + var_x[j].sum().item()
            logit, label = -a * d + b, float(i == j)
            match += max(logit, 0.0) - logit * label + math.log1p(math.exp(-abs(logit)))
    expected = dict(
        poisson=(out.rate - r * torch.log(out.rate + 1e-8)).sum() / B,
        poisson_cross=(out.rate_cross - r * torch.log(out.rate_cross + 1e-8)).sum() / B,
        video=((out.video_rec - v) ** 2).sum() / B,
        video_cross=((out.video_cross - v) ** 2).sum() / B,
        kl_fusion=(kl(mu_p, var_p, mu_x, var_x) + kl(mu_p, var_p, mu_y, var_y)).sum() / B,
        kl_cross=(kl(mu_x, var_x, mu_y, var_y) + kl(mu_y, var_y, mu_x, var_x)).sum() / B,
        match=torch.tensor(match / B, dtype=torch.float64),
    )
    losses = out.losses._asdict()
    for name, value in expected.items():
        torch.testing.assert_close(losses[name], value, msg=name)
    torch.testing.assert_close(out.losses.total, sum(weights[f"w_{k}"] * v for k, v in expected.items()))

    # eval mode decodes the means: fused -> rate, video_rec; stimulus -> rate_cross; neural -> video_cross
    g = out.gaussians
    torch.testing.assert_close(out.rate, model.decode_responses(g.mu_p, "m1"))
    torch.testing.assert_close(out.rate_cross, model.decode_responses(g.mu_y, "m1"))
    torch.testing.assert_close(out.video_rec, model.decode_video(g.mu_p, (32, 64)))
    torch.testing.assert_close(out.video_cross, model.decode_video(g.mu_x, (32, 64)))


def test_poisson_floor_is_the_constant_rate_nll():
    target = torch.rand(4, 6, 5, dtype=torch.float64) * 2
    mean = target.mean(dim=(0, 1))
    expected = sum(float(mean[n] - target[b, t, n] * math.log(mean[n] + 1e-8))
                   for b in range(4) for t in range(6) for n in range(5)) / 4
    assert pnba.poisson_floor(target).item() == pytest.approx(expected, rel=1e-12)


def test_gradcheck_probabilistic_terms():
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    mu_x, logvar_x, mu_y, logvar_y = rand(3, 5), rand(3, 5, scale=0.5), rand(3, 5), rand(3, 5, scale=0.5)
    a, b = torch.tensor(0.3, dtype=torch.float64, requires_grad=True), rand(())
    eps = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3)]

    def alignment_terms(mu_x, logvar_x, mu_y, logvar_y, a, b):
        _, _, z_p, z_x, z_y, kl_px, kl_py, kl_sym = fuse_sample_kl(mu_x, logvar_x, mu_y, logvar_y, *eps)
        return torch.stack([z_p.sum(), z_x.sum(), z_y.sum(), (kl_px + kl_py).sum(), kl_sym.sum(),
                            match_loss(mu_y, logvar_y, mu_x, logvar_x, a, b)])

    assert torch.autograd.gradcheck(alignment_terms, (mu_x, logvar_x, mu_y, logvar_y, a, b))
    rate = (torch.rand(2, 3, 4, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    target = torch.rand(2, 3, 4, generator=g, dtype=torch.float64) * 3
    assert torch.autograd.gradcheck(lambda r: pnba.poisson_nll(r, target), (rate,))
    assert torch.autograd.gradcheck(lambda r: pnba.squared_error(r, target), (rate,))


@pytest.mark.parametrize("dims, act, dropout", [(2, "silu", 0.0), (3, "silu", 0.0), (2, "leaky_relu", 0.0),
                                                (2, "silu", 0.3)])
def test_norm_act_conv_equals_plain_composition(dims, act, dropout):
    """The memory-lean unit (hand-written backward) against GroupNorm -> act -> dropout -> conv."""
    torch.manual_seed(0)
    norm = pnba.group_norm(8, max_groups=4).double()
    conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(8, 4, 3, padding=1).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 8, *(4,) * dims, dtype=torch.float64, requires_grad=True)
    params = [x, norm.weight, norm.bias, conv.weight, conv.bias]
    torch.manual_seed(1)
    y = pnba.norm_act_conv(x, norm, conv, act, dropout, training=True)
    torch.manual_seed(1)
    keep = torch.rand_like(x) >= dropout
    h = F.group_norm(x, 4, norm.weight, norm.bias, 1e-6)
    y_plain = conv((F.silu(h) if act == "silu" else F.leaky_relu(h)) * keep / (1 - dropout))
    grad = torch.randn_like(y)
    torch.testing.assert_close(y, y_plain)
    ours, plain = torch.autograd.grad(y, params, grad), torch.autograd.grad(y_plain, params, grad)
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a, b)
    if dropout == 0:
        def unit(*p):
            return pnba._NormActConv.apply(*p, None, 4, act, conv.padding, 0.0)
        assert torch.autograd.gradcheck(unit, tuple(params))


@pytest.mark.parametrize("residual, out_bias", [(True, False), (False, True)])
def test_attention_equals_explicit_softmax(residual, out_bias):
    torch.manual_seed(0)
    attention = pnba.SelfAttention(6, residual=residual, out_bias=out_bias).double()
    x = torch.randn(2, 6, 3, 4, 5, dtype=torch.float64)
    tokens = F.layer_norm(x.flatten(2).transpose(1, 2), (6,), attention.norm.weight, attention.norm.bias)
    q, k, v = (tokens @ attention.qkv.weight.T).reshape(2, 60, 3, 6).unbind(2)
    h = attention.proj_out(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(6), dim=-1) @ v)
    h = h.transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(attention(x), x + h if residual else h)


def test_video_to_neural_layouts():
    v = torch.randn(2, 3, 5, 4, 8)                         # (B, C, T, h, w) video latent
    positions = v.flatten(3).transpose(2, 3)               # (B, C, 32, T)
    nearest = build(video_to_neural="nearest")
    torch.testing.assert_close(nearest._video_to_neural(v), positions[:, :, [0, 8, 16, 24]])
    pooled = build(video_to_neural="pool")._video_to_neural(v)
    torch.testing.assert_close(pooled, v.mean(-1).transpose(2, 3))       # each latent row = a mean
    z = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(pnba.PNBA._neural_to_video(z, (4, 8)),
                               z.transpose(2, 3)[..., None].expand(2, 3, 5, 4, 8))


# --------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("preset, N, T", [("tiny", 40, 8), ("demo", 150, 16), ("paper", 300, 16)])
def test_output_shapes(preset, N, T):
    model = build(preset, {"m": N})
    r, v = batch(1, T, N)
    train = preset != "paper"                              # paper: forward only (see the slow test)
    model.train(train)
    with torch.set_grad_enabled(train):
        out = model(r, v, "m")
    assert out.rate.shape == out.rate_cross.shape == (1, T, N)
    assert out.video_rec.shape == out.video_cross.shape == (1, 1, T, 32, 64)
    for name in pnba.Gaussians._fields:
        assert getattr(out.gaussians, name).shape == (1, 8, 4, T), name
    assert all(torch.isfinite(t) for t in out.losses)
    assert (out.rate > 0).all() and (out.video_rec >= 0).all() and (out.video_rec <= 1).all()
    if train:
        out.losses.total.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_paper_size_training_step():
    model = build("paper", {"dynamic29156": 7440})
    r, v = batch(1, 16, 7440)
    out = model(r, v, "dynamic29156")
    out.losses.total.backward()
    assert out.rate.shape == (1, 16, 7440) and out.gaussians.mu_p.shape == (1, 8, 4, 16)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_single_modality_encode_equals_its_part_of_the_joint_encode():
    model = build()
    r, v = batch()
    joint, neural, stimulus = model.encode(r, v), model.encode(responses=r), model.encode(video=v)
    torch.testing.assert_close(neural.mu_x, joint.mu_x)
    torch.testing.assert_close(neural.logvar_x, joint.logvar_x)
    torch.testing.assert_close(stimulus.mu_y, joint.mu_y)
    assert neural.mu_y is None and stimulus.mu_x is None
    assert neural.mu_p is neural.mu_x and stimulus.logvar_p is stimulus.logvar_y
    with pytest.raises(ValueError, match="needs responses, video or both"):
        model.encode()


def test_eval_is_deterministic_and_training_samples():
    model = build(dropout=0.1, proj_dropout=0.1)
    r, v = batch()
    model.eval()
    first, second = model(r, v, "m1"), model(r, v, "m1")
    torch.testing.assert_close(first.rate, second.rate, rtol=0, atol=0)
    torch.testing.assert_close(first.losses.total, second.losses.total, rtol=0, atol=0)
    means = model.encode(r, v)
    model.train()
    a, b = model(r, v, "m1"), model(r, v, "m1")
    assert not torch.allclose(a.rate, b.rate) and not torch.allclose(a.video_cross, b.video_cross)
    assert not torch.allclose(a.rate, first.rate)
    again = model.encode(r, v)                            # encode: no sampling, no dropout, in any mode
    assert model.training
    for name in pnba.Gaussians._fields:
        torch.testing.assert_close(getattr(again, name), getattr(means, name), rtol=0, atol=0)


@pytest.mark.parametrize("projector", ["set", "conv"])
def test_new_animal_is_encoded_without_retraining(projector):
    model = build(neural_projector=projector).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for n in (57, 5, 400):
        g = model.encode(responses=batch(2, 8, n)[0])
        assert g.mu_x.shape == (2, 8, 4, 8)
        assert torch.isfinite(g.mu_x).all() and torch.isfinite(g.logvar_x).all()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_unknown_animal_or_wrong_neuron_count_is_a_clear_error():
    model = build()
    r, v = batch()
    with pytest.raises(ValueError, match=r"mouse 'nope' is not one the model was built for; known: m1, m2"):
        model(r, v, "nope")
    with pytest.raises(ValueError, match="not one the model was built for"):
        model.decode_responses(torch.zeros(1, 8, 4, 8), "nope")
    with pytest.raises(ValueError, match="responses have 40 neurons; mouse 'm2' has 23"):
        model(r, v, "m2")


def test_invalid_model_settings_are_rejected():
    with pytest.raises(ValueError, match="neural_projector is 'mlp'; valid: conv, set"):
        build(neural_projector="mlp")
    with pytest.raises(ValueError, match="set_slots must equal"):
        build(set_slots=32)
    with pytest.raises(ValueError, match="without '.'"):
        build(counts={"a.b": 10})
    with pytest.raises(ValueError, match="video_features must end with z_channels"):
        build(z_channels=4)


@pytest.mark.parametrize("projector, readout", [("set", "neuron"), ("conv", "resize")])
def test_checkpointing_gives_the_same_losses_and_gradients(projector, readout):
    results = []
    for checkpointing in (False, True):
        model = build(neural_projector=projector, neural_readout=readout, checkpointing=checkpointing,
                      dropout=0.1, proj_dropout=0.1)
        r, v = batch(2)
        torch.manual_seed(5)
        out = model(r, v, "m1")
        out.losses.total.backward()
        results.append((out.losses.total, {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss, loss_ckpt)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ckpt[name], msg=name)


def test_checkpoint_round_trip(tmp_path):
    cfg = config.preset("tiny")
    cfg.model.w_match, cfg.model.readout_channels = 0.5, 4
    torch.manual_seed(0)
    model = pnba.PNBA(cfg.model, COUNTS).eval()
    path = tmp_path / "model.pt"
    pnba.save_checkpoint(path, {"model": model.state_dict(), "config": config.to_dict(cfg),
                                "neuron_counts": model.neuron_counts})
    ckpt = torch.load(path, weights_only=True)
    assert pnba.load_checkpoint(path).keys() == ckpt.keys()
    rebuilt = pnba.PNBA(config.from_dict(ckpt["config"]).model, ckpt["neuron_counts"]).eval()
    rebuilt.load_state_dict(ckpt["model"])
    r, v = batch()
    a, b = model(r, v, "m1"), rebuilt(r, v, "m1")
    torch.testing.assert_close(a.losses.total, b.losses.total, rtol=0, atol=0)
    torch.testing.assert_close(a.rate, b.rate, rtol=0, atol=0)

    bad = config.to_dict(cfg)
    bad["model"]["z_chanels"] = 8
    with pytest.raises(config.ConfigError, match="z_chanels"):
        config.from_dict(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(pnba.CheckpointError, match="junk.pt"):
        pnba.load_checkpoint(junk)
    with pytest.raises(pnba.CheckpointError, match="'m2' has 24 neurons in the data but 23 neurons"):
        pnba.check_mice(ckpt, {"m1": 40, "m2": 24, "new": 7}, source=path)
    pnba.check_mice(ckpt, {"m1": 40, "new": 7}, source=path)


def test_per_neuron_corr():
    g = np.random.default_rng(0)
    p, t = g.normal(size=(50, 4)), g.normal(size=(50, 4))
    t[:, 3] = 1.0
    r = pnba.per_neuron_corr(torch.tensor(p), torch.tensor(t)).numpy()
    np.testing.assert_allclose(r[:3], [np.corrcoef(p[:, i], t[:, i])[0, 1] for i in range(3)], rtol=1e-5)
    assert np.isnan(r[3])


# ------------------------------------------------------------------------------- published weights


def published_parameter_shapes(cfg) -> dict:
    """Names and shapes of the published model's parameters (zhuyu-cs/PNBA models/pnba.py,
    encoder_decoder_ca.py, encoder_decoder_video.py, read by hand). Its per-mouse output modules
    (output_projectors.interpolate[mouse]) are parameter-free, so the animals do not appear."""
    shapes = {}

    def conv(name, c_out, c_in, *kernel):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c_out, c_in, *kernel), (c_out,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name, c_in, c_out, kernel=(3, 3)):
        norm(f"{name}.norm1", c_in)
        conv(f"{name}.conv1", c_out, c_in, *kernel)
        norm(f"{name}.norm2", c_out)
        conv(f"{name}.conv2", c_out, c_out, *kernel)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_out, c_in, *(1,) * len(kernel))

    def attention(name, c, proj="proj_out", bias=False):
        norm(f"{name}.norm", c)
        shapes[f"{name}.qkv.weight"], shapes[f"{name}.{proj}.weight"] = (3 * c, c), (c, c)
        if bias:
            shapes[f"{name}.{proj}.bias"] = (c,)

    C, ch, mult, z = cfg.proj_channels, cfg.base_channel, cfg.ch_mult, cfg.z_channels
    conv("in_projectors.neuron_expand", C, 1, 3, 3)
    norm("in_projectors.norm1", C)
    resnet("in_projectors.resblock1", C, C)
    attention("in_projectors.atten", C)
    resnet("in_projectors.resblock2", C, C)
    norm("in_projectors.norm_out", C)

    conv("encoder.conv_in", ch, C, 3, 3)
    block_in = ch
    for i, m in enumerate(mult):
        for j in range(cfg.num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", block_in, ch * m)
            block_in = ch * m
        if i < len(mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 4, 1)
    resnet("encoder.mid.block_1", block_in, block_in)
    attention("encoder.mid.attn_1", block_in)
    resnet("encoder.mid.block_2", block_in, block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", z, block_in, 3, 3)

    f, blocks, tk = cfg.video_features, cfg.video_blocks, cfg.temporal_kernel
    conv("video_encoder.stem", f[0], 1, 3, 3, 3)
    k = 0
    for i in range(len(f) - 1):
        for _ in range(blocks[i]):
            resnet(f"video_encoder.blocks.{k}", f[i], f[i], (tk, 3, 3))
            k += 1
        conv(f"video_encoder.blocks.{k}.conv", f[i + 1], f[i], 1, 3, 3)
        norm(f"video_encoder.blocks.{k}.norm", f[i + 1])
        k += 1
    resnet("video_encoder.final_blocks.0", f[-1], f[-1], (tk, 3, 3))
    attention("video_encoder.final_blocks.1", f[-1], proj="proj", bias=True)
    resnet("video_encoder.final_blocks.2", f[-1], f[-1], (tk, 3, 3))
    conv("video_encoder.final_conv", f[-1], f[-1], 3, 3, 3)

    for head in ("video_embed_mean", "video_embed_log_var", "ca_embed_mean", "ca_embed_logvar"):
        resnet(head, z, z)

    dch = 2 * ch
    block_in = dch * mult[-1]
    conv("decoder.conv_in", block_in, z, 3, 3)
    resnet("decoder.mid.block_1", block_in, block_in)
    attention("decoder.mid.attn_1", block_in)
    resnet("decoder.mid.block_2", block_in, block_in)
    for i in reversed(range(len(mult))):
        for j in range(cfg.num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, dch * mult[i])
            block_in = dch * mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", C, block_in, 3, 3)

    resnet("output_projectors.resblock1", C, C)
    resnet("output_projectors.resblock2", C, C)
    conv("output_projectors.process1", C, C, 3, 3)
    norm("output_projectors.norm1", C)
    conv("output_projectors.process2", C // 2, C, 3, 3)
    norm("output_projectors.norm2", C // 2)
    conv("output_projectors.out", 1, C // 2, 1, 1)

    f, blocks = f[::-1], blocks[::-1]
    conv("video_decoder.initial_conv", f[0], f[0], 3, 3, 3)
    resnet("video_decoder.initial_blocks.0", f[0], f[0], (tk, 3, 3))
    attention("video_decoder.initial_blocks.1", f[0], proj="proj", bias=True)
    resnet("video_decoder.initial_blocks.2", f[0], f[0], (tk, 3, 3))
    k = 0
    for i in range(len(f) - 1):
        conv(f"video_decoder.blocks.{k}.conv", f[i], f[i], 3, 3)
        k += 1
        for j in range(blocks[i]):
            resnet(f"video_decoder.blocks.{k}", f[i] if j == 0 else f[i + 1], f[i + 1], (tk, 3, 3))
            k += 1
    conv("video_decoder.final_conv", 1, f[-1], 3, 3, 3)
    shapes["a"] = shapes["b"] = ()
    return shapes


def test_every_published_parameter_maps_onto_ours():
    cfg = config.preset("paper").model
    published = published_parameter_shapes(cfg)
    assert sum(math.prod(s) for s in published.values()) == 42_525_564
    # as saved from DataParallel / DDP
    state = {f"module.{name}": torch.zeros(shape) for name, shape in published.items()}
    converted = pnba.convert_reference_state_dict(state)
    model = pnba.PNBA(cfg, {"dynamic29156-11-10-Video-8744edeac3b4d1ce16b680916b5267ce": 7440,
                            "dynamic29228-2-10-Video-8744edeac3b4d1ce16b680916b5267ce": 7928})
    ours = model.state_dict()
    assert converted.keys() == ours.keys()
    assert all(converted[k].shape == ours[k].shape for k in ours)
    model.load_state_dict(converted, strict=True)
    assert sum(p.numel() for p in model.parameters()) == 42_525_564
    with pytest.raises(ValueError, match="not a parameter of the published"):
        pnba.convert_reference_state_dict({"module.encoder_x.weight": torch.zeros(1)})


def _gn(x, sd, name, groups):
    return F.group_norm(x, groups, sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-6)


def _resnet(sd, name, x):
    conv = F.conv3d if x.dim() == 5 else F.conv2d
    padding = tuple(k // 2 for k in sd[f"{name}.conv1.weight"].shape[2:])
    h = conv(F.silu(_gn(x, sd, f"{name}.norm1", min(32, x.shape[1]))), sd[f"{name}.conv1.weight"],
             sd[f"{name}.conv1.bias"], padding=padding)
    h = conv(F.silu(_gn(h, sd, f"{name}.norm2", min(32, h.shape[1]))), sd[f"{name}.conv2.weight"],
             sd[f"{name}.conv2.bias"], padding=padding)
    if f"{name}.nin_shortcut.weight" in sd:
        x = conv(x, sd[f"{name}.nin_shortcut.weight"], sd[f"{name}.nin_shortcut.bias"])
    return x + h


def _attention(sd, name, x, proj, residual):
    B, C = x.shape[:2]
    tokens = x.flatten(2).transpose(1, 2)
    tokens = F.layer_norm(tokens, (C,), sd[f"{name}.norm.weight"], sd[f"{name}.norm.bias"])
    q, k, v = (tokens @ sd[f"{name}.qkv.weight"].T).reshape(B, tokens.shape[1], 3, C).unbind(2)
    weights = torch.softmax(q @ k.transpose(1, 2) * C ** -0.5, dim=-1)
    h = F.linear(weights @ v, sd[f"{name}.{proj}.weight"], sd.get(f"{name}.{proj}.bias"))
    h = h.transpose(1, 2).reshape(x.shape)
    return x + h if residual else h


def published_encode(sd, cfg, responses, video):
    """The published forward up to the means and log-variances, written out with torch.nn.functional on
    the published parameter names (materialised attention, nearest video-to-neural)."""
    x = F.conv2d(responses.transpose(1, 2).unsqueeze(1), sd["in_projectors.neuron_expand.weight"],
                 sd["in_projectors.neuron_expand.bias"], padding=(0, 1))
    x = F.adaptive_max_pool2d(x, (cfg.proj_neurons, x.shape[-1]))
    x = F.leaky_relu(_gn(x, sd, "in_projectors.norm1", 32))
    x = _resnet(sd, "in_projectors.resblock1", x)
    x = _attention(sd, "in_projectors.atten", x, "proj_out", residual=True)
    x = _resnet(sd, "in_projectors.resblock2", x)
    h = F.leaky_relu(_gn(x, sd, "in_projectors.norm_out", 32))
    h = F.conv2d(h, sd["encoder.conv_in.weight"], sd["encoder.conv_in.bias"], padding=1)
    for i in range(len(cfg.ch_mult)):
        for j in range(cfg.num_res_blocks):
            h = _resnet(sd, f"encoder.down.{i}.block.{j}", h)
        if i < len(cfg.ch_mult) - 1:
            h = F.conv2d(h, sd[f"encoder.down.{i}.downsample.conv.weight"],
                         sd[f"encoder.down.{i}.downsample.conv.bias"], stride=(4, 1))
    h = _resnet(sd, "encoder.mid.block_1", h)
    h = _resnet(sd, "encoder.mid.block_2", _attention(sd, "encoder.mid.attn_1", h, "proj_out", residual=True))
    h = F.conv2d(F.silu(_gn(h, sd, "encoder.norm_out", min(32, h.shape[1]))), sd["encoder.conv_out.weight"],
                 sd["encoder.conv_out.bias"], padding=1)

    v = F.conv3d(video, sd["video_encoder.stem.weight"], sd["video_encoder.stem.bias"], padding=1)
    k = 0
    while f"video_encoder.blocks.{k}.conv.weight" in sd or f"video_encoder.blocks.{k}.conv1.weight" in sd:
        name = f"video_encoder.blocks.{k}"
        if f"{name}.conv.weight" in sd:                    # SpatialDownsample
            v = F.conv3d(v, sd[f"{name}.conv.weight"], sd[f"{name}.conv.bias"], stride=(1, 2, 2),
                         padding=(0, 1, 1))
            v = F.silu(_gn(v, sd, f"{name}.norm", min(32, v.shape[1])))
        else:
            v = _resnet(sd, name, v)
        k += 1
    v = _resnet(sd, "video_encoder.final_blocks.0", v)
    v = _attention(sd, "video_encoder.final_blocks.1", v, "proj", residual=False)
    v = _resnet(sd, "video_encoder.final_blocks.2", v)
    v = F.conv3d(v, sd["video_encoder.final_conv.weight"], sd["video_encoder.final_conv.bias"], padding=1)
    B, C, T = v.shape[:3]
    v = F.interpolate(v.reshape(B, C, T, -1).transpose(2, 3), size=(h.shape[2], T), mode="nearest")
    return {"mu_x": _resnet(sd, "ca_embed_mean", h), "logvar_x": _resnet(sd, "ca_embed_logvar", h),
            "mu_y": _resnet(sd, "video_embed_mean", v), "logvar_y": _resnet(sd, "video_embed_log_var", v)}


def test_converted_weights_give_the_published_means_and_log_variances():
    cfg = config.preset("paper").model                     # the published structure at a small size
    cfg.proj_neurons, cfg.proj_channels, cfg.base_channel, cfg.ch_mult = 64, 32, 16, (1, 2, 4)
    cfg.video_features, cfg.video_blocks, cfg.temporal_kernel = (8, 16, 32, 8), (1, 1, 1, 1), 3
    g = torch.Generator().manual_seed(0)
    sd = {name: torch.randn(shape, generator=g, dtype=torch.float64) * 0.3
          for name, shape in published_parameter_shapes(cfg).items()}
    model = pnba.PNBA(cfg, {"m": 50}).double()
    model.load_state_dict(pnba.convert_reference_state_dict(sd), strict=True)
    r, v = batch(2, 8, 50, dtype=torch.float64)
    ours, published = model.encode(r, v), published_encode(sd, cfg, r, v)
    for name, value in published.items():
        torch.testing.assert_close(getattr(ours, name), value, rtol=1e-9, atol=1e-9, msg=name)


# ----------------------------------------------------------------------------- order-invariant projector


def test_set_projector_is_invariant_to_neuron_order_and_conv_is_not():
    r = batch(2, 8, 60)[0]
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(3))
    coords = torch.randn(60, 3) * 300 + 1000
    model = build(use_coords=True).eval()
    for c in (None, coords):
        a = model.encode(r, coords=c)
        b = model.encode(r[..., perm], coords=None if c is None else c[perm])
        torch.testing.assert_close(a.mu_x, b.mu_x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.logvar_x, b.logvar_x, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model.encode(r, coords=coords).mu_x, model.encode(r).mu_x, atol=1e-3)
    conv = build(neural_projector="conv").eval()
    a, b = conv.encode(r).mu_x, conv.encode(r[..., perm]).mu_x
    assert (a - b).abs().max() > 1e-2 * a.abs().max()


def test_set_projector_scales_linearly_from_10_to_10000_neurons():
    model = build()
    saved = {}
    for n in (10, 100, 1000, 10_000):
        model.zero_grad(set_to_none=True)
        storages = {}   # bytes of every tensor kept for backward, by storage

        def pack(t, storages=storages):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        r = batch(2, 8, n)[0]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            projected = model.neural_projector(r)
        assert projected.shape == (2, 8, 64, 8)
        projected.square().mean().backward()
        grads = [p.grad for p in model.neural_projector.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        g = model.encode(responses=r)
        assert g.mu_x.shape == (2, 8, 4, 8) and torch.isfinite(g.mu_x).all()
        saved[n] = sum(storages.values())
    per_neuron = [(saved[b] - saved[a]) / (b - a) for a, b in ((10, 100), (100, 1000), (1000, 10_000))]
    assert max(per_neuron) / min(per_neuron) < 1.05, per_neuron     # activation memory affine in N
