"""One dataclass config shared by every script, with presets and `--section.field value` overrides.

    from config import preset, parse_overrides
    cfg = preset("demo")                                   # Config(model=..., data=..., optim=..., run=...)
    cfg, rest = parse_overrides(cfg, ["--optim.lr", "3e-4", "--ckpt", "x.pt"])   # rest == ["--ckpt", "x.pt"]

Configs are plain data: `to_dict(cfg)` goes into checkpoints and JSON, `from_dict(d)` rebuilds it.
Unknown keys are rejected with the valid names listed, both from the command line and from a dict.
`validate(cfg)` checks every field's type, range and choices and the rules between fields in one pass:
scripts call it before they write anything.

Also what every script shares below the model and data layers (this is the ground floor): the one way
files are written (`atomic_path`, `write_atomic`: temp file beside the target, then rename), the one
device choice (`pick_device`), and the output-folder check (`check_writable`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import inspect
import json
import math
import os
import re
import tempfile
import typing
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A config key or value that does not exist or does not parse."""


@dataclass
class ModelConfig:
    # neural projector: "conv" is the published one (3-tap conv over the neuron index + adaptive max
    # pool); "set" treats neurons as an unordered set of tokens (order-invariant, see README)
    neural_projector: str = "conv"
    proj_neurons: int = 256           # neuron axis after the projector
    proj_channels: int = 128          # channels of the projector output
    proj_dropout: float = 0.0         # dropout in the projector
    set_slots: int = 256              # "set": learned query slots (== proj_neurons)
    set_heads: int = 4                # "set": heads of the slot cross-attention
    set_token_dim: int = 64           # "set": width of a (neuron, frame) token
    use_coords: bool = False          # "set": add each neuron's normalised cortical coordinates
    # "set": a learned embedding per unit of each training animal, added to its tokens (a new animal has
    # none: it is encoded identity-free)
    unit_embedding: bool = False
    # training: a batch's unit embeddings, and independently its coordinates, are hidden with this
    # probability, so that the identity-free path (a new animal's) stays trained
    identity_dropout: float = 0.0
    # recorded behaviour that is not the stimulus (Sensorium: pupil dilation, running speed, eye x, y,
    # z-scored) fed to "readout" (each neuron's drive), "encoder" (the neural projector) or "both"
    state_input: str = "none"
    state_dim: int = 4                # channels of the recorded behavioural state
    # neural output stage: "resize" is the published one (bicubic resize of the neuron axis to N + convs);
    # "neuron" is a per-neuron factorised readout (order-consistent; pairs with "set", see pnba.py)
    neural_readout: str = "resize"
    readout_channels: int = 16        # "neuron": shared feature channels each neuron reads
    latent_readout: bool = False      # "neuron": each neuron also reads the latent of its frame linearly
    readout_bias_init: str = "zero"   # "neuron": "zero" | "mean" (each neuron starts at its mean rate)
    base_channel: int = 64            # VQGAN-style encoder width (the neural decoder is twice as wide)
    ch_mult: tuple[int, ...] = (1, 2, 2, 4)  # channels per encoder level (x4 fewer neurons per level)
    num_res_blocks: int = 1           # residual blocks per encoder/decoder level
    dropout: float = 0.0              # dropout in encoder/decoder residual blocks
    z_channels: int = 8               # latent channels C; latent is (B, C, n, T)
    mean_norm: str = "none"           # "none" (published) | "batch": BatchNorm of mu_x, mu_y (BN-VAE)
    video_features: tuple[int, ...] = (32, 64, 128, 8) # video encoder channels per level (last = z_channels)
    video_blocks: tuple[int, ...] = (4, 3, 2, 1) # 3-D residual blocks per video level
    temporal_kernel: int = 5          # temporal kernel of the video 3-D convs
    video_to_neural: str = "pool"     # "nearest" (published) | "pool"
    video_attention_residual: bool = False  # add the input back around the video attention (published: no)
    # stimulus modality y: "video" (Sensorium, the video branch above) | "behaviour" (a low-dimensional time
    # series (B, T, D) such as hand velocity, NWB monkeys: a temporal ResNet encoder and decoder)
    stimulus: str = "video"
    behaviour_dim: int = 2            # "behaviour": D
    behaviour_channels: int = 64      # "behaviour": width of the temporal ResNet
    behaviour_blocks: int = 2         # "behaviour": residual blocks in the encoder and in the decoder
    unit_dropout: float = 0.0         # training: each neuron hidden from the neural encoder with prob. p
    checkpointing: bool = False       # recompute the full-resolution stages in backward (less memory)
    kernels: str = "auto"             # "auto" (Triton on CUDA) | "triton" | "torch"
    # loss weights (published: all 1)
    w_poisson: float = 1.0            # Poisson NLL of responses from the fused sample
    w_poisson_cross: float = 1.0      # ... from the stimulus sample (cross-modal encoding)
    w_stimulus: float = 1.0           # squared error of the stimulus (video/behaviour) from the fused sample
    w_stimulus_cross: float = 1.0     # ... from the neural sample (cross-modal decoding)
    w_kl_fusion: float = 1.0          # KL(q_p||q_x) + KL(q_p||q_y)
    w_kl_cross: float = 1.0           # KL(q_x||q_y) + KL(q_y||q_x)
    w_match: float = 1.0              # probabilistic matching BCE
    w_kl_prior: float = 0.0           # KL(x||N(0,I)) + KL(y||N(0,I)) (not published)
    match_scale_init: float = 1.0     # initial a of the matching logits -a d + b (published 1)


@dataclass
class DataConfig:
    paths: tuple[str, ...] = ()       # mouse folders or parent folders; empty: the synthetic demo
    holdout: tuple[str, ...] = ()     # mouse names (or unique prefixes) that take no gradient
    frames: int = 16                  # window length in frames
    batch_size: int = 32              # windows per step and per rank, all from one mouse
    num_workers: int = 2              # DataLoader worker processes
    height: int = 32                  # video height after resizing (Sensorium: 36 -> 32)
    width: int = 64                   # video width after resizing
    std_floor: float = 0.01           # response std floor, as a fraction of the mean std
    synth_preset: str = "demo"        # synthetic dataset written when paths is empty
    # NWB recordings (data.paths naming .nwb files or folders holding them): one animal per session
    bin_ms: float = 20.0              # spike-count and kinematics bin width
    window_ms: tuple[float, float] = (-250.0, 450.0)  # trial window around movement onset
    area: str = ""                    # only the units of this area ("M1", "PMd"); "": all


@dataclass
class OptimConfig:
    lr: float = 1e-4                  # AdamW peak learning rate
    betas: tuple[float, float] = (0.9, 0.999) # AdamW betas
    weight_decay: float = 0.05        # AdamW weight decay
    warmup_iters: int = 600           # linear learning-rate warm-up steps
    warmup_ratio: float = 1.0 / 3.0   # warm-up starts at lr * warmup_ratio
    min_lr: float = 1e-7              # end of the cosine decay
    epochs: int = 400                 # passes over the training trials (one random window per trial)
    grad_clip: float = 0.0            # max global grad norm; 0 disables clipping
    max_nonfinite: int = 5            # abort after this many non-finite losses in a row
    align_warmup_iters: int = 0       # ramp KL and matching weights from 0 to 1 over these steps
    stable_fraction: float = 0.0      # fraction of the post-warm-up steps held at lr before the cosine
    readout_lr_scale: float = 1.0     # lr multiplier of the per-animal readout parameters


@dataclass
class RunConfig:
    seed: int = 42                    # seeds the model init, the windows and the sampling noise
    device: str = "auto"              # "auto" | "cpu" | "cuda"
    amp: bool = True                  # bf16 autocast on CUDA (ignored on CPU)
    log_every: int = 50               # iterations between metric lines
    val_every: int = 1                # epochs between validations (0: never)
    ckpt_every: int = 100             # epochs between kept checkpoints (last.pt is always written)
    max_steps: int = 0                # stop after this many optimiser steps (0: run all epochs)
    # torchrun: how long a rank waits for the others in a collective before the job stops with one line
    # (a rank that died or hangs); must exceed the longest validation, which rank 0 runs alone
    collective_timeout_s: float = 1800.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _paper() -> Config:
    """The reference mouse-V1 configuration (zhuyu-cs/PNBA config/config.py)."""
    cfg = Config()
    m = cfg.model   # the ModelConfig defaults are the published sizes; these are its published choices
    m.neural_projector, m.neural_readout, m.video_to_neural = "conv", "resize", "nearest"
    return cfg


def _demo() -> Config:
    """Trains in under 5 minutes on 2 CPU cores on the synthetic demo dataset (216 steps)."""
    cfg = Config()
    m = cfg.model
    m.neural_projector, m.neural_readout = "set", "neuron"
    m.proj_neurons, m.set_slots, m.proj_channels, m.set_token_dim = 64, 64, 32, 32
    m.base_channel, m.ch_mult = 16, (1, 2, 4)            # 3 levels: latent (B, 8, 4, T) as in the paper
    m.video_features, m.video_blocks, m.temporal_kernel = (4, 8, 16, 8), (1, 1, 1, 1), 3
    # half-resolution video and batch 8: the full-resolution 3-D convs set a floor of ~2 s/step on CPU;
    # no loader workers: a batch loads in ~6 ms, and on 2 cores workers only take CPU from the model
    cfg.data.batch_size, cfg.data.num_workers, cfg.data.height, cfg.data.width = 8, 0, 16, 32
    cfg.optim.lr, cfg.optim.warmup_iters, cfg.optim.epochs, cfg.optim.min_lr = 1e-3, 50, 9, 1e-5
    _learning_objective(cfg)
    # what makes the generative path learn within the budget (README "Objective"): every neuron starts
    # at its mean rate and reads the latent of its frame linearly, and its readout moves 10x faster
    m.readout_bias_init, m.latent_readout, cfg.optim.readout_lr_scale = "mean", True, 10.0
    cfg.run.log_every, cfg.run.val_every, cfg.run.ckpt_every = 10, 3, 9
    return cfg


def _monkey() -> Config:
    """The demo's recipe for NWB monkeys (stimulus = hand velocity): trains on the synthetic monkeys in a few
    minutes on 2 CPU cores. A window is a whole trial: -250 ... +450 ms around movement onset in 20 ms
    bins."""
    cfg = Config()
    m = cfg.model
    m.stimulus, m.behaviour_dim, m.behaviour_channels, m.behaviour_blocks = "behaviour", 2, 32, 2
    m.neural_projector, m.neural_readout = "set", "neuron"
    # 16 slots and 2 levels (latent (B, 8, 4, T) as in the paper): a window is 35 frames, and the slots'
    # attention over slots x frames positions is what costs on CPU
    m.proj_neurons, m.set_slots, m.proj_channels, m.set_token_dim = 16, 16, 32, 32
    m.base_channel, m.ch_mult = 16, (1, 2)
    cfg.data.frames, cfg.data.batch_size, cfg.data.num_workers = 35, 16, 0
    cfg.data.synth_preset = "monkey"
    cfg.optim.lr, cfg.optim.warmup_iters, cfg.optim.epochs, cfg.optim.min_lr = 1e-3, 50, 10, 1e-5
    _learning_objective(cfg)
    m.readout_bias_init, m.latent_readout, cfg.optim.readout_lr_scale = "mean", True, 10.0
    m.unit_dropout = 0.3
    _unit_identity(cfg)
    m.state_input = "none"            # a monkey's recorded behaviour is its stimulus
    cfg.run.log_every, cfg.run.val_every, cfg.run.ckpt_every = 20, 5, 10
    return cfg


def _learning_objective(cfg: Config) -> None:
    """The changes to the published objective that apply to any architecture (README "Objective")."""
    m = cfg.model
    latent = m.z_channels * (m.proj_neurons // 4 ** (len(m.ch_mult) - 1)) * cfg.data.frames
    # the matching logits -a d + b start in BCE's working range (a = 1/D, D latent dimensions), and the
    # alignment terms ramp in after the reconstruction terms have made the latents informative
    cfg.model.match_scale_init = 1 / latent
    cfg.optim.align_warmup_iters = max(cfg.optim.align_warmup_iters, 3 * cfg.optim.warmup_iters)
    # BN-VAE means: no trial-independent template, trial differences on the variances' scale
    cfg.model.mean_norm = "batch"
    # the published video attention has no residual path: at initialisation it averages every position
    # and frame, so the stimulus encoder's output starts the same for every video
    cfg.model.video_attention_residual = True
    # the lr stays at its peak for half of the run before the cosine decay
    cfg.optim.stable_fraction = 0.5
    # recorded behaviour that is not the stimulus (Sensorium's running and pupil) goes to the readout and
    # the neural encoder, so that no latent has to carry a private state (README "Science on data we did
    # not design"); a recording without it is refused with one line naming it
    cfg.model.state_input = "both"


def _unit_identity(cfg: Config) -> None:
    """Training animals' units carry learned embeddings; half the batches hide them, so the identity-free
    path, a new animal's, stays trained (README "Science on data we did not design"). On for monkeys, whose
    training sessions otherwise lose what their units carry; off for the mouse demo, where it cost the
    held-out animals their alignment. Coordinates stay off: unique per unit, they act as an identity a new
    animal cannot share (held-out zero-shot d 3.8 -> 0.4 on the demo)."""
    cfg.model.unit_embedding, cfg.model.identity_dropout = True, 0.5


def _recommended() -> Config:
    """The published architecture (`paper`) with the objective that learns (README "Objective")."""
    cfg = _paper()
    _learning_objective(cfg)
    return cfg


def _tiny() -> Config:
    """Smallest model with every stage present; for tests."""
    cfg = Config()
    m = cfg.model
    m.neural_projector, m.neural_readout = "set", "neuron"
    m.proj_neurons, m.set_slots, m.proj_channels, m.set_heads, m.set_token_dim = 64, 64, 8, 2, 8
    m.base_channel, m.ch_mult = 8, (1, 1, 1)             # latent (B, 8, 4, T) as in the paper
    m.video_features, m.video_blocks, m.temporal_kernel = (4, 4, 8, 8), (1, 1, 1, 1), 3
    cfg.data.batch_size, cfg.data.num_workers, cfg.data.frames = 4, 0, 8
    cfg.optim.lr, cfg.optim.warmup_iters, cfg.optim.epochs = 1e-3, 2, 1
    cfg.run.log_every, cfg.run.val_every, cfg.run.ckpt_every = 1, 1, 1
    return cfg


PRESETS = {"paper": _paper, "recommended": _recommended, "demo": _demo, "monkey": _monkey, "tiny": _tiny}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]()


def to_dict(cfg: Config) -> dict:
    """Plain nested dict of builtins (tuples become lists): safe for JSON and weights_only loads."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _sections() -> dict[str, type]:
    return {f.name: f.type if isinstance(f.type, type) else globals()[f.type]
            for f in dataclasses.fields(Config)}


def valid_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _sections().items() for f in dataclasses.fields(cls)]


def _field_type(section: str, name: str):
    hints = typing.get_type_hints(_sections()[section])
    return hints[name]


def _convert(value, typ, key: str):
    """Convert a CLI string (or a JSON value) to the field's declared type."""
    origin = typing.get_origin(typ)
    try:
        if origin is tuple:
            args = typing.get_args(typ)
            if isinstance(value, str):
                value = [v for v in value.replace(" ", ",").split(",") if v != ""]
            elem = args[0]
            return tuple(_convert(v, elem, key) for v in value)
        if typ is bool:
            if isinstance(value, bool):
                return value
            low = str(value).lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: cannot read {value!r} as {getattr(typ, '__name__', typ)}") from None


def set_key(cfg: Config, key: str, value) -> None:
    """Set `section.field` from a string or JSON value, with type conversion and key checking."""
    section, _, name = key.partition(".")
    if key not in valid_keys():
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
    setattr(getattr(cfg, section), name, _convert(value, _field_type(section, name), key))


def parse_overrides(cfg: Config, argv: list[str], allowed=None) -> tuple[Config, list[str]]:
    """Apply every `--section.field value` (or `--section.field=value`) in argv to cfg.

    Returns the config and the arguments that are not config keys, for the script's own parser. allowed:
    the keys that apply to the script (default: all); another valid key is a ConfigError naming them.
    """
    sections = tuple(_sections())
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and arg[2:].split("=", 1)[0].split(".", 1)[0] in sections \
                and "." in arg.split("=", 1)[0]:
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"--{key} needs a value")
                value = argv[i + 1]
                i += 1
            if allowed is not None and key in valid_keys() and key not in allowed:
                raise ConfigError(f"--{key} does not apply to this script; keys that apply: "
                                  f"{', '.join('--' + k for k in allowed) or 'none'}")
            set_key(cfg, key, value)
        else:
            rest.append(arg)
        i += 1
    return cfg, rest


# keys that were renamed, so that checkpoints written before the rename still load
RENAMED_KEYS = {"model.w_video": "model.w_stimulus", "model.w_video_cross": "model.w_stimulus_cross"}


def from_dict(d: dict) -> Config:
    """Rebuild a Config from `to_dict` output; unknown keys are rejected (RENAMED_KEYS are taken under their
    new names)."""
    cfg = Config()
    for section, values in d.items():
        if section not in _sections():
            raise ConfigError(f"unknown config section {section!r}; valid: {', '.join(_sections())}")
        for name, value in values.items():
            key = f"{section}.{name}"
            set_key(cfg, RENAMED_KEYS.get(key, key), value)
    return cfg


def field_docs() -> dict[str, str]:
    """`section.field` -> its meaning, read from the comments beside and above each field in this file:
    the one place options are documented (train.py --help-config and the README's table come from here)."""
    docs = {}
    for section, cls in _sections().items():
        pending: list[str] = []
        for line in inspect.getsource(cls).splitlines()[1:]:
            text = line.strip()
            if text.startswith("#"):
                pending.append(text.lstrip("# "))
                continue
            m = re.match(r"(\w+): .*?=.*?(?:#\s*(.*))?$", text)
            if m:
                docs[f"{section}.{m.group(1)}"] = " ".join(pending + [m.group(2) or ""]).strip()
            pending = []
    return docs


def _cell(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(_cell(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def config_table() -> str:
    """The README's config reference: one row per field, one column per preset, and the field's meaning."""
    presets = {name: to_dict(preset(name)) for name in PRESETS}
    docs = field_docs()
    lines = ["| key | " + " | ".join(presets) + " | meaning |", "|---" * (len(presets) + 2) + "|"]
    for key in valid_keys():
        section, name = key.split(".")
        cells = " | ".join(_cell(p[section][name]) for p in presets.values())
        lines.append(f"| `{key}` | {cells} | {docs[key].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def help_text() -> str:
    """Every `--section.field` override with its type, default and meaning (train.py --help-config)."""
    docs, default = field_docs(), to_dict(Config())
    out = []
    for section in _sections():
        out.append(f"{section}:")
        for key in (k for k in valid_keys() if k.startswith(section + ".")):
            name = key.split(".")[1]
            typ = _field_type(section, name)
            kind = getattr(typ, "__name__", str(typ)) if typing.get_origin(typ) is not tuple else \
                f"tuple of {typing.get_args(typ)[0].__name__}"
            choices = f"; one of {', '.join(CHOICES[key])}" if key in CHOICES else ""
            value = _cell(default[section][name]) or '""'
            out.append(f"  --{key} {kind} (default {value}{choices})")
            out.append(f"      {docs[key]}")
    return "\n".join(out)


def describe(cfg: Config) -> str:
    """Human-readable `section.field = value` lines (for logs and the README reference)."""
    d = to_dict(cfg)
    return "\n".join(f"{s}.{k} = {v}" for s, vals in d.items() for k, v in vals.items())


# ---------------------------------------------------------------------------------------------
# Validation: one pass over every field (type, range, choices) and the rules between fields, before a
# script writes anything. The model checks its section here too (pnba._check_model_config).
# ---------------------------------------------------------------------------------------------

CHOICES = {
    "model.neural_projector": ("conv", "set"),
    "model.neural_readout": ("resize", "neuron"),
    "model.readout_bias_init": ("zero", "mean"),
    "model.mean_norm": ("none", "batch"),
    "model.video_to_neural": ("nearest", "pool"),
    "model.stimulus": ("video", "behaviour"),
    "model.state_input": ("none", "readout", "encoder", "both"),
    "model.kernels": ("auto", "triton", "torch"),
    # data's synthetic presets (a test keeps them equal); demo2 and monkey2: the second family
    "data.synth_preset": ("tiny", "demo", "demo2", "monkey", "monkey2"),
    "run.device": ("auto", "cpu", "cuda"),           # and cuda:<index>
}
_AT_LEAST_0, _AT_LEAST_1 = (lambda v: v >= 0, ">= 0"), (lambda v: v >= 1, ">= 1")
_POSITIVE, _FRACTION = (lambda v: v > 0, "> 0"), (lambda v: 0 <= v < 1, "in [0, 1)")
RANGES = {   # every number not listed here must be >= 0; tuples: every element
    **dict.fromkeys(["model.proj_neurons", "model.proj_channels", "model.set_slots", "model.set_heads",
                     "model.set_token_dim", "model.readout_channels", "model.base_channel", "model.ch_mult",
                     "model.z_channels", "model.video_features", "model.temporal_kernel", "data.frames",
                     "data.batch_size", "data.height", "data.width", "optim.epochs", "optim.max_nonfinite",
                     "run.log_every", "model.behaviour_dim", "model.behaviour_channels"],
                    _AT_LEAST_1),
    **dict.fromkeys(["model.proj_dropout", "model.dropout", "model.unit_dropout", "model.identity_dropout",
                     "optim.betas",
                     "optim.stable_fraction"],
                    _FRACTION),
    **dict.fromkeys(["model.match_scale_init", "optim.lr", "optim.readout_lr_scale", "data.bin_ms",
                     "run.collective_timeout_s"],
                    _POSITIVE),
    "optim.warmup_ratio": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "data.window_ms": (lambda v: True, "any time"),      # before and after movement onset
}


def _type_problem(key: str, value, typ) -> str | None:
    if typing.get_origin(typ) is tuple:
        if not isinstance(value, tuple):
            return f"{key} is {value!r} ({type(value).__name__}); must be a tuple"
        args = typing.get_args(typ)
        if args[-1] is not Ellipsis and len(value) != len(args):
            return f"{key} is {value!r}; must have {len(args)} entries"
        if args[-1] is Ellipsis and key.startswith("model.") and not value:
            return f"{key} is empty; must have at least one entry"
        return next(filter(None, (_type_problem(key, v, args[0]) for v in value)), None)
    ok = (isinstance(value, typ) and not (typ is int and isinstance(value, bool))) or \
        (typ is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        return f"{key} is {value!r} ({type(value).__name__}); must be {typ.__name__}"
    if typ is float and not math.isfinite(value):
        return f"{key} is {value!r}; must be finite"
    return None


def _field_problems(cfg, section: str):
    """Type, range and choice of every field of one section, in declaration order."""
    part = getattr(cfg, section)
    for f in dataclasses.fields(part):
        key, value, typ = f"{section}.{f.name}", getattr(part, f.name), _field_type(section, f.name)
        problem = _type_problem(key, value, typ)
        if problem:
            yield problem
            continue
        if key in CHOICES:
            valid = CHOICES[key]
            if value not in valid and not (key == "run.device" and re.fullmatch(r"cuda:\d+", value)):
                yield f"{key} is {value!r}; valid: {', '.join(valid)}"
            continue
        if typ is bool or typ is str or typing.get_args(typ)[:1] == (str,):
            continue
        test, text = RANGES.get(key, _AT_LEAST_0)
        for v in value if isinstance(value, tuple) else (value,):
            if not test(v):
                yield f"{key} is {value!r}; must be {text}"
                break


def _model_rules(m: ModelConfig):
    """What the architecture can be built with (fields already of the right type and range)."""
    shrink = 4 ** (len(m.ch_mult) - 1)
    rules = [
        (not m.latent_readout or m.neural_readout == "neuron",
         'model.latent_readout needs model.neural_readout "neuron"'),
        (not m.unit_embedding or m.neural_projector == "set",
         'model.unit_embedding needs model.neural_projector "set" (embeddings are added to unit tokens)'),
        (m.state_input == "none" or m.stimulus == "video",
         'model.state_input is for recordings whose behaviour is not the stimulus (model.stimulus "video")'),
        (m.state_input == "none" or m.state_dim >= 1, "model.state_input needs model.state_dim >= 1"),
        (m.readout_bias_init == "zero" or m.neural_readout == "neuron",
         'model.readout_bias_init "mean" needs model.neural_readout "neuron" (the only per-neuron bias)'),
        (m.proj_neurons % shrink == 0,
         f"model.proj_neurons must be divisible by 4^(len(ch_mult) - 1) = {shrink}"),
        (m.neural_projector != "set" or m.set_slots == m.proj_neurons,
         "model.set_slots must equal model.proj_neurons"),
        (m.neural_projector != "set" or m.set_token_dim % m.set_heads == 0,
         "model.set_token_dim must be divisible by model.set_heads"),
        (m.video_features[-1] == m.z_channels, "model.video_features must end with z_channels"),
        (len(m.video_features) == len(m.video_blocks) and min(m.video_blocks[1:], default=1) >= 1,
         "model.video_blocks must have one entry per video level, each past the first at least 1"),
        (m.temporal_kernel % 2 == 1,
         f"model.temporal_kernel is {m.temporal_kernel}; must be odd (the convs keep the frame count)"),
    ]
    return [message for ok, message in rules if not ok]


def validate_model(m: ModelConfig) -> None:
    """ConfigError (a ValueError) with one line naming the first model setting that cannot be built."""
    problems = list(_field_problems(Config(model=m), "model"))
    problems = problems or _model_rules(m)
    if problems:
        raise ConfigError(problems[0])


def validate(cfg: Config) -> Config:
    """Every field and every rule between fields, in one pass; ConfigError with one line naming the first
    problem. Returns cfg."""
    problems = [p for section in _sections() for p in _field_problems(cfg, section)]
    if not problems:
        problems = _model_rules(cfg.model)
        levels = 2 ** (len(cfg.model.video_features) - 1)
        if cfg.data.height % levels or cfg.data.width % levels:
            problems.append(f"data.height and data.width ({cfg.data.height}x{cfg.data.width}) must be "
                            f"divisible by 2^(len(model.video_features) - 1) = {levels}")
        if cfg.data.window_ms[1] - cfg.data.window_ms[0] < cfg.data.bin_ms:
            problems.append(f"data.window_ms {cfg.data.window_ms} must span at least one bin of data.bin_ms")
        if cfg.model.mean_norm != "none" and cfg.data.batch_size < 2:
            problems.append('model.mean_norm "batch" normalises over the batch: data.batch_size must be >= 2')
    if problems:
        raise ConfigError(problems[0])
    return cfg


# ---------------------------------------------------------------------------------------------
# Files and devices: one code path for every script
# ---------------------------------------------------------------------------------------------

_TEMP = re.compile(r"\.tmp(\d+)$")     # <target>.tmp<pid>: what atomic_path writes before the rename


@contextlib.contextmanager
def atomic_path(path):
    """The one way files are written: yields `<path>.tmp<pid>` to write; on a clean exit it is renamed over
    path (readers never see half a file), on an error it is removed. A kill leaves it behind, so a dead
    writer's temp files of the same target are removed first (and see remove_stale_temps)."""
    path = os.fspath(path)
    remove_stale_temps(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_atomic(path, content: bytes | str) -> None:
    """Write bytes or text to path through atomic_path."""
    with atomic_path(path) as tmp, open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True          # someone else's live process
    return True


def remove_stale_temps(folder, target: str = "*") -> list[str]:
    """Remove the temp files (`<target>.tmp<pid>`) that writers killed mid-write left in folder; a live
    process's are left alone (it may be writing). Returns the removed paths."""
    removed = []
    name = "*" if target == "*" else glob.escape(target)        # "*": every target (escaped, none)
    for path in glob.glob(os.path.join(glob.escape(os.fspath(folder)), name + ".tmp*")):
        m = _TEMP.search(path)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
                removed.append(path)
    return removed


def check_writable(folder) -> None:
    """ConfigError unless files can be created in folder (made later if missing): checked before the work
    starts by creating and removing a file in it, or in its nearest existing parent (permission bits do
    not tell: root, read-only mounts, ACLs)."""
    folder = os.path.abspath(os.fspath(folder))
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"{folder}: cannot write there ({probe} is a file, not a folder)")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=probe)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise ConfigError(f"{folder}: cannot write there ({e.strerror or type(e).__name__})") from None


def pick_device(choice: str = "auto", ddp_device=None):
    """The one device choice (run.device, extract.py and bench.py --device): torchrun's device if given;
    "auto" is CUDA when available, else CPU; "cuda" or "cuda:<i>" without CUDA is a ConfigError."""
    import torch  # here, so that config stays importable (and fast) without torch

    if ddp_device is not None:
        return ddp_device
    valid = ", ".join(CHOICES["run.device"])
    if choice not in CHOICES["run.device"] and not re.fullmatch(r"cuda:\d+", str(choice)):
        raise ConfigError(f"run.device is {choice!r}; valid: {valid}, cuda:<index>")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice != "cpu" and not torch.cuda.is_available():
        raise ConfigError(f"run.device is {choice!r}, but no CUDA device is available "
                          "(torch.cuda.is_available() is False); use cpu or auto")
    if choice.startswith("cuda:") and int(choice[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"run.device is {choice!r}, but there are {torch.cuda.device_count()} CUDA devices")
    return torch.device(choice)


if __name__ == "__main__":   # python config.py: the README's config table, generated from this file
    print(config_table(), end="")
