"""One dataclass config shared by every script, with presets and `--section.field value` overrides.

    from config import preset, parse_overrides
    cfg = preset("demo")                                   # Config(model=..., data=..., optim=..., run=...)
    cfg, rest = parse_overrides(cfg, ["--optim.lr", "3e-4", "--ckpt", "x.pt"])   # rest == ["--ckpt", "x.pt"]

Configs are plain data: `to_dict(cfg)` goes into checkpoints and JSON, `from_dict(d)` rebuilds it.
Unknown keys are rejected with the valid names listed, both from the command line and from a dict.
"""

from __future__ import annotations

import dataclasses
import json
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
    # neural output stage: "resize" is the published one (bicubic resize of the neuron axis to N + convs);
    # "neuron" is a per-neuron factorised readout (order-consistent; pairs with "set", see pnba.py)
    neural_readout: str = "resize"
    readout_channels: int = 16        # "neuron": shared feature channels each neuron reads
    base_channel: int = 64            # VQGAN-style encoder width (the neural decoder is twice as wide)
    ch_mult: tuple[int, ...] = (1, 2, 2, 4)  # channels per encoder level (x4 fewer neurons per level)
    num_res_blocks: int = 1           # residual blocks per encoder/decoder level
    dropout: float = 0.0              # dropout in encoder/decoder residual blocks
    z_channels: int = 8               # latent channels C; latent is (B, C, n, T)
    video_features: tuple[int, ...] = (32, 64, 128, 8) # video encoder channels per level (last = z_channels)
    video_blocks: tuple[int, ...] = (4, 3, 2, 1) # 3-D residual blocks per video level
    temporal_kernel: int = 5          # temporal kernel of the video 3-D convs
    video_to_neural: str = "pool"     # "nearest" (published) | "pool"
    checkpointing: bool = False       # recompute the full-resolution stages in backward (less memory)
    kernels: str = "auto"             # "auto" (Triton on CUDA) | "triton" | "torch"
    # loss weights (published: all 1)
    w_poisson: float = 1.0            # Poisson NLL of responses from the fused sample
    w_poisson_cross: float = 1.0      # ... from the stimulus sample (cross-modal encoding)
    w_video: float = 1.0              # squared error of video from the fused sample
    w_video_cross: float = 1.0        # ... from the neural sample (cross-modal decoding)
    w_kl_fusion: float = 1.0          # KL(q_p||q_x) + KL(q_p||q_y)
    w_kl_cross: float = 1.0           # KL(q_x||q_y) + KL(q_y||q_x)
    w_match: float = 1.0              # probabilistic matching BCE
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


@dataclass
class RunConfig:
    seed: int = 42                    # seeds the model init, the windows and the sampling noise
    device: str = "auto"              # "auto" | "cpu" | "cuda"
    amp: bool = True                  # bf16 autocast on CUDA (ignored on CPU)
    log_every: int = 50               # iterations between metric lines
    val_every: int = 1                # epochs between validations (0: never)
    ckpt_every: int = 100             # epochs between kept checkpoints (last.pt is always written)
    max_steps: int = 0                # stop after this many optimiser steps (0: run all epochs)


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
    # half-resolution video and batch 8: the full-resolution 3-D convs set a floor of ~2 s/step on CPU
    cfg.data.batch_size, cfg.data.num_workers, cfg.data.height, cfg.data.width = 8, 2, 16, 32
    cfg.optim.lr, cfg.optim.warmup_iters, cfg.optim.epochs, cfg.optim.min_lr = 1e-3, 50, 9, 1e-5
    # against collapse (README "Collapse"): logits of the matching loss start in BCE's working range
    # (a = 1/D for D = 8*4*16 latent dimensions), and the alignment terms ramp in after the
    # reconstruction terms have made the latents informative
    m.match_scale_init = 1 / 512
    cfg.optim.align_warmup_iters = 150
    cfg.run.log_every, cfg.run.val_every, cfg.run.ckpt_every = 10, 3, 9
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


PRESETS = {"paper": _paper, "demo": _demo, "tiny": _tiny}


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


def parse_overrides(cfg: Config, argv: list[str]) -> tuple[Config, list[str]]:
    """Apply every `--section.field value` (or `--section.field=value`) in argv to cfg.

    Returns the config and the arguments that are not config keys, for the script's own parser.
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
            set_key(cfg, key, value)
        else:
            rest.append(arg)
        i += 1
    return cfg, rest


def from_dict(d: dict) -> Config:
    """Rebuild a Config from `to_dict` output; unknown keys are rejected."""
    cfg = Config()
    for section, values in d.items():
        if section not in _sections():
            raise ConfigError(f"unknown config section {section!r}; valid: {', '.join(_sections())}")
        for name, value in values.items():
            set_key(cfg, f"{section}.{name}", value)
    return cfg


def describe(cfg: Config) -> str:
    """Human-readable `section.field = value` lines (for logs and the README reference)."""
    d = to_dict(cfg)
    return "\n".join(f"{s}.{k} = {v}" for s, vals in d.items() for k, v in vals.items())
