"""Tests of kernels/: the torch reference against closed forms, and the Triton kernels (run on CPU by
Triton's interpreter) against the reference, values and gradients. `pytest test_kernels.py`."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest.py does it too)

import pytest
import torch

import kernels
from kernels import reference as ref

RTOL = 1e-5  # fp32, the bar


def _close(actual, expected, rtol=RTOL):
    """rtol on every element, with an absolute floor of rtol x max |expected| for the entries near zero."""
    atol = rtol * float(expected.detach().abs().max()) + 1e-30
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _gaussians(B, D, dtype=torch.float32, lv_scale=2.0):
    """mu_x, logvar_x, mu_y, logvar_y (B, D), leaves that require grad."""
    g = torch.Generator().manual_seed(0)
    scales = (1.0, lv_scale, 1.0, lv_scale)
    return [(s * torch.randn(B, D, generator=g, dtype=dtype)).requires_grad_() for s in scales]


def _noise(B, D, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, D, generator=g, dtype=dtype) for _ in range(3)]


def _ab(dtype=torch.float32, a=0.05, b=0.3):
    return torch.tensor(a, dtype=dtype, requires_grad=True), torch.tensor(b, dtype=dtype, requires_grad=True)


# --- the reference itself, against independent closed forms (fp64) -----------------------------------------


def test_reference_poe_and_kl_closed_form():
    mu_x, lv_x, mu_y, lv_y = (t.detach() for t in _gaussians(4, 9, torch.float64))
    vx, vy = lv_x.exp(), lv_y.exp()
    mu_p, lv_p = ref.poe(mu_x, lv_x, mu_y, lv_y)
    _close(lv_p.exp(), vx * vy / (vx + vy), 1e-12)
    _close(mu_p, (mu_x * vy + mu_y * vx) / (vx + vy), 1e-12)
    normal = torch.distributions.Normal
    expected = torch.distributions.kl_divergence(normal(mu_x, vx.sqrt()), normal(mu_y, vy.sqrt())).sum(-1)
    _close(ref.gaussian_kl(mu_x, lv_x, mu_y, lv_y), expected, 1e-12)


def test_reference_match_loss_double_loop():
    mu_y, lv_y, mu_x, lv_x = (t.detach() for t in _gaussians(5, 7, torch.float64, lv_scale=0.5))
    a, b = 0.2, 1.5
    total = 0.0
    for i in range(5):
        for j in range(5):
            d = ((mu_y[i] - mu_x[j]) ** 2).sum() + lv_y[i].exp().sum() + lv_x[j].exp().sum()
            logit = -a * d + b
            total -= torch.nn.functional.logsigmoid(logit if i == j else -logit)
    _close(ref.match_loss(mu_y, lv_y, mu_x, lv_x, a, b), total, 1e-12)


# --- kernel A: fusion, sampling, KLs -----------------------------------------------------------------------


def _triton_a(eps):
    return lambda *x: kernels.fuse_sample_kl(*x, *eps, backend="triton")


def _triton_b(*x):
    return kernels.match_loss(*x, backend="triton")


def _outputs_and_grads(fn, ins, upstream):
    outs = fn(*ins)
    return outs, torch.autograd.grad(outs, ins, upstream)


@pytest.mark.parametrize("B,D", [(1, 1), (1, 37), (5, 77), (3, 1100)])  # 1100: several blocks, ragged tail
def test_fuse_sample_kl_matches_reference(B, D):
    ins, eps = _gaussians(B, D), _noise(B, D)
    g = torch.Generator().manual_seed(2)
    upstream = [torch.randn(B, D, generator=g) for _ in range(5)]
    upstream += [torch.randn(B, generator=g) for _ in range(3)]  # the KLs (B,)
    got, got_grads = _outputs_and_grads(_triton_a(eps), ins, upstream)
    want, want_grads = _outputs_and_grads(lambda *x: ref.fuse_sample_kl(*x, *eps), ins, upstream)
    for a, b in zip(got + got_grads, want + want_grads, strict=True):
        _close(a, b)


@pytest.mark.parametrize("used", [(2,), (7,), (0, 5), (3, 4, 6)])
def test_fuse_sample_kl_unused_outputs(used):
    """Outputs without a gradient are skipped in the backward kernel; the rest must still be exact."""
    ins, eps = _gaussians(3, 20), _noise(3, 20)

    def loss(outs):
        return sum((k + 1.5) * outs[k].sum() for k in used)

    got = torch.autograd.grad(loss(_triton_a(eps)(*ins)), ins, allow_unused=True)
    want = torch.autograd.grad(loss(ref.fuse_sample_kl(*ins, *eps)), ins, allow_unused=True)
    for a, b in zip(got, want, strict=True):
        _close(a, torch.zeros_like(ins[0]) if b is None else b)


# fast_mode (a random projection of the Jacobian) where the full one costs the interpreter > 5 s
@pytest.mark.parametrize("B,D,given_noise,fast", [(1, 3, True, False), (2, 5, False, True)])
def test_fuse_sample_kl_gradcheck(B, D, given_noise, fast):
    ins = _gaussians(B, D, torch.float64)
    noise = _noise(B, D, torch.float64) if given_noise else [None] * 3

    def fn(*x):
        return kernels.fuse_sample_kl(*x, *noise, seed=11, backend="triton")

    assert torch.autograd.gradcheck(fn, ins, fast_mode=fast)


def test_fuse_sample_kl_extreme_logvars():
    """lv at +-20 in all combinations and |mu_y - mu_x| up to 1e3: finite, and equal to the fp64 reference."""
    B, D = 3, 64
    lv = torch.tensor([-20.0, 20.0, 0.0, -19.5])
    lv_x = lv.repeat_interleave(4).repeat(B, D // 16)
    lv_y = lv.repeat(4).repeat(B, D // 16)
    mu_x = torch.linspace(-1e3, 1e3, B * D).reshape(B, D)
    mu_y = -mu_x.flip(-1)
    ins = [t.clone().requires_grad_() for t in (mu_x, lv_x, mu_y, lv_y)]
    eps = _noise(B, D)
    upstream = [torch.ones(B, D)] * 5 + [torch.ones(B)] * 3
    got, got_grads = _outputs_and_grads(_triton_a(eps), ins, upstream)
    eps64 = [e.double() for e in eps]
    want, want_grads = _outputs_and_grads(lambda *x: ref.fuse_sample_kl(*x, *eps64),
                                          [t.detach().double().requires_grad_() for t in ins],
                                          [u.double() for u in upstream])
    for a, b in zip(got + got_grads, want + want_grads, strict=True):
        assert torch.isfinite(a).all()
        _close(a.double(), b, 1e-4)


def test_bf16_inputs_are_computed_in_fp32():
    """bf16 in and out (KLs and loss fp32): the fp32 reference on the same values, up to bf16 rounding."""
    ins = [t.detach().bfloat16().requires_grad_() for t in _gaussians(3, 40)]
    eps = [e.bfloat16() for e in _noise(3, 40)]
    ins32 = [t.detach().float().requires_grad_() for t in ins]
    got = kernels.fuse_sample_kl(*ins, *eps, backend="triton")
    want = ref.fuse_sample_kl(*ins32, *(e.float() for e in eps))
    for k, (x, y) in enumerate(zip(got, want, strict=True)):
        assert x.dtype == (torch.bfloat16 if k < 5 else torch.float32)
        _close(x.float(), y, 1e-2 if k < 5 else RTOL)
    a, b = _ab()
    _close(kernels.match_loss(*ins, a, b, backend="triton"), ref.match_loss(*ins32, a, b))


def test_philox_noise_is_standard_normal_and_reproducible():
    B, D = 8, 1024
    zeros = torch.zeros(B, D, requires_grad=True)
    lv = torch.zeros(B, D, requires_grad=True)
    _, _, z_p, z_x, z_y, *_ = kernels.fuse_sample_kl(zeros, lv, zeros, lv, seed=1234, backend="triton")
    n = 3 * B * D
    # mu = 0, lv = 0: z_x and z_y are the noise itself, z_p = noise / sqrt(2)
    noise = torch.stack([z_p * 2**0.5, z_x, z_y]).detach()
    assert abs(noise.mean()) < 5 / n**0.5
    assert abs(noise.var() - 1) < 5 * (2 / n) ** 0.5
    assert abs((noise.flatten(1) < 0).float().mean() - 0.5) < 5 * 0.5 / n**0.5
    corr = torch.corrcoef(noise.flatten(1))
    assert (corr - torch.eye(3)).abs().max() < 5 / (B * D) ** 0.5  # three independent streams
    again = kernels.fuse_sample_kl(zeros, lv, zeros, lv, seed=1234, backend="triton")
    other = kernels.fuse_sample_kl(zeros, lv, zeros, lv, seed=1235, backend="triton")
    assert torch.equal(again[3], z_x) and not torch.equal(other[3], z_x)
    # the backward regenerates the same noise: d sum(z_x) / d lv_x = eps_x / 2
    (g,) = torch.autograd.grad(z_x.sum(), lv)
    assert torch.equal(g, 0.5 * z_x.detach())


# --- kernel B: probabilistic matching ----------------------------------------------------------------------


@pytest.mark.parametrize("B,D", [(1, 1), (1, 20), (6, 40), (37, 45)])  # 37: several 32-row tiles, ragged
def test_match_loss_matches_reference(B, D):
    ins, (a, b) = _gaussians(B, D, lv_scale=0.5), _ab()
    got, got_grads = _outputs_and_grads(lambda *x: kernels.match_loss(*x, backend="triton") * 1.7,
                                        ins + [a, b], None)
    want, want_grads = _outputs_and_grads(lambda *x: ref.match_loss(*x) * 1.7, ins + [a, b], None)
    for x, y in zip((got, *got_grads), (want, *want_grads), strict=True):
        _close(x, y)


@pytest.mark.parametrize("B,fast", [(1, False), (3, True)])
def test_match_loss_gradcheck(B, fast):
    ins, (a, b) = _gaussians(B, 6, torch.float64, lv_scale=0.5), _ab(torch.float64)
    assert torch.autograd.gradcheck(_triton_b, ins + [a, b], fast_mode=fast)


def test_match_loss_extreme_logvars_and_distances():
    """Means ~1e3 and log-variances at +-20: d_ij up to ~1e10, logits down to ~-1e8; finite and exact."""
    B, D = 6, 50
    mu_y, lv_y, mu_x, lv_x = (t.detach() for t in _gaussians(B, D, lv_scale=20.0))
    mu_y, lv_y, mu_x, lv_x = mu_y * 1e3, lv_y.clamp(-20, 20), mu_x * 1e3, lv_x.clamp(-20, 20)
    ins = [t.clone().requires_grad_() for t in (mu_y, lv_y, mu_x, lv_x)]
    a, b = _ab(a=0.01)
    got, got_grads = _outputs_and_grads(_triton_b, ins + [a, b], None)
    ins64 = [t.detach().double().requires_grad_() for t in ins + [a, b]]
    want, want_grads = _outputs_and_grads(ref.match_loss, ins64, None)
    for x, y in zip((got, *got_grads), (want, *want_grads), strict=True):
        assert torch.isfinite(x).all()
        _close(x.double(), y, 1e-4)


# --- dispatch and integration ------------------------------------------------------------------------------


def test_dispatch(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("PNBA_KERNELS", raising=False)
    assert kernels.resolve_backend("auto", cpu) == "torch"
    assert kernels.resolve_backend("triton", cpu) == "triton"  # allowed here: TRITON_INTERPRET=1
    monkeypatch.setenv("PNBA_KERNELS", "triton")
    assert kernels.resolve_backend("auto", cpu) == "triton"
    assert kernels.resolve_backend("torch", cpu) == "torch"  # an explicit argument beats the environment
    monkeypatch.setenv("PNBA_KERNELS", "cuda")
    with pytest.raises(ValueError, match="PNBA_KERNELS"):
        kernels.resolve_backend("auto", cpu)
    with pytest.raises(ValueError, match="backend"):
        kernels.resolve_backend("fast", cpu)


def test_default_cpu_path_is_the_reference(monkeypatch):
    monkeypatch.delenv("PNBA_KERNELS", raising=False)
    ins, eps, (a, b) = _gaussians(2, 8), _noise(2, 8), _ab()
    for got, want in zip(kernels.fuse_sample_kl(*ins, *eps), ref.fuse_sample_kl(*ins, *eps), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(kernels.match_loss(*ins, a, b), ref.match_loss(*ins, a, b))
    drawn = kernels.fuse_sample_kl(*ins, seed=5)[2]
    assert torch.equal(drawn, kernels.fuse_sample_kl(*ins, seed=5)[2])


def test_bad_inputs_are_rejected():
    ins = _gaussians(2, 8)
    with pytest.raises(ValueError, match="eps_p, eps_x, eps_y"):
        kernels.fuse_sample_kl(*ins, torch.zeros(2, 8), backend="triton")
    with pytest.raises(ValueError, match="one shape"):
        kernels.match_loss(ins[0], ins[1], ins[2][:, :4], ins[3], 1.0, 0.0, backend="triton")


def test_torch_compile_treats_kernels_as_opaque_ops():
    """Custom ops with fake kernels let torch.compile trace around the kernels (aot_eager: no C compiler)."""
    ins, eps, (a, b) = _gaussians(3, 20), _noise(3, 20), _ab()

    def loss(*x):
        outs = kernels.fuse_sample_kl(*x, *eps, backend="triton")
        return outs[2].square().sum() + outs[5].sum() + kernels.match_loss(outs[0], outs[1], *x[2:], a, b,
                                                                           backend="triton")

    got, got_grads = _outputs_and_grads(torch.compile(loss, backend="aot_eager"), ins, None)
    want, want_grads = _outputs_and_grads(loss, ins, None)
    for x, y in zip((got, *got_grads), (want, *want_grads), strict=True):
        _close(x, y)


def test_model_loss_is_the_same_with_kernels_on_and_off(monkeypatch):
    pnba = pytest.importorskip("pnba")
    from config import preset

    cfg = preset("tiny")
    torch.manual_seed(0)
    model = pnba.PNBA(cfg.model, {"m1": 10})
    responses = torch.rand(2, cfg.data.frames, 10)
    video = torch.rand(2, 1, cfg.data.frames, cfg.data.height, cfg.data.width)
    results = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("PNBA_KERNELS", backend)  # what cfg.model.kernels = "auto" defers to
        torch.manual_seed(1)  # the same sampling noise
        model.zero_grad()
        total = model(responses, video, "m1").losses.total
        total.backward()
        results.append((total.detach(), torch.cat([p.grad.flatten() for p in model.parameters()
                                                         if p.grad is not None])))
    (loss_off, grad_off), (loss_on, grad_on) = results
    _close(loss_on, loss_off)
    _close(grad_on, grad_off)
