"""Synthetic dataset in the Sensorium 2023 folder format, with its ground truth beside it. Two generators
(SynthSpec.family) share the folders, tiers, statistics and truth writing:

- "latent": every response and the video from one known shared stimulus latent (docs/data_formats.md §5);
- "filters": receptive-field filters on naturalistic movies, retinotopy, a private behavioural state per
  trial, gains over orders of magnitude and zero-inflated non-Poisson noise (preset demo2): the
  assumptions "latent" makes easy, broken on purpose."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter1d

from recordings.common import TRUTH_DIR, DataError, save_npz, synthetic_spec, write_new_folder
from recordings.sensorium import DATA_KEYS, TEST_TIERS


@dataclass
class SynthSpec:
    """What write_synthetic writes. mice: (folder prefix, neurons, kind) with kind "old" (recorded test
    responses, `none` slots), "new" (hidden zero-filled test tiers) or "control" (responses driven by a
    stimulus of its own per trial, independent of the shown one: a negative control).

    family "latent" uses n_latent, lag and silent_neurons; "filters" uses the fields after `family`
    (write_synthetic describes both models)."""

    mice: tuple[tuple[str, int, str], ...]
    heldout: tuple[str, ...]          # prefixes meant to be held out of training (controls are held out too)
    n_latent: int = 4                 # K
    t_valid: int = 48
    t_pad: int = 52
    n_shared_train: int = 6           # train videos shown once to every mouse
    n_unique_train: int = 3           # train videos each mouse sees alone
    n_oracle_videos: int = 2          # shown to every mouse, oracle_repeats times each
    oracle_repeats: int = 3
    n_main_test_videos: int = 1       # repeats alternate live_test_main / final_test_main
    test_repeats: int = 2
    n_bonus_videos: int = 1           # shorter (bonus_fraction * t_valid), live/final_test_bonus
    bonus_fraction: float = 0.8
    none_trials: dict = field(default_factory=lambda: {"old": 2, "new": 0, "control": 1})
    stats_layout: str = "per_frame"   # or "per_neuron"
    dtype: str = "float32"            # or "float64"
    video_jitter: int = 0             # ±grey levels of per-trial noise on every copy of a video
    lag: int = 2                      # responses follow the latent by this many frames
    silent_neurons: int = 2           # gain 1e-4: exercises the std floor
    family: str = "latent"            # "latent" (today's generator, same bytes) or "filters"
    # -- family "filters" only --
    # fractions of neuron types: simple (rectified Gabor), complex (energy of a quadrature Gabor pair),
    # centre-surround (rectified ON or OFF difference of Gaussians), luminance (rectified ON or OFF
    # Gaussian-weighted mean luminance); normalised to sum 1
    rf_types: tuple[float, ...] = (0.4, 0.3, 0.15, 0.15)
    rf_sigma_px: tuple[float, float] = (2.5, 6.0)     # RF envelope sd, uniform in this range (36 x 64 px)
    window_offset_px: float = 4.0     # sd of each mouse's own visual offset of its imaging window (px)
    retinotopy_scatter_px: float = 3.0  # sd of each RF centre around its retinotopic position (px)
    state_strength: float = 1.0       # how much the private behavioural state modulates every neuron; 0: not
    state_frames: float = 15.0        # time scale of the state (sd of its Gaussian smoothing, frames)
    gain_log_sd: float = 1.5          # sd of the neurons' log gains (natural log): orders of magnitude
    silent_fraction: float = 0.05     # neurons with gain 1e-3 (near silent)
    noise_shape: tuple[float, float] = (0.3, 3.0)     # Gamma(k, 1/k) noise, k per neuron log-uniform in range
    dropout_prob: float = 0.2         # a frame's response is 0 with this probability (zero inflation)


_FILTER_FIELDS = ("family", "rf_types", "rf_sigma_px", "window_offset_px", "retinotopy_scatter_px",
                  "state_strength", "state_frames", "gain_log_sd", "silent_fraction", "noise_shape",
                  "dropout_prob")


SYNTH_PRESETS = {
    # unit tests: 5 mice of ~20 slots, 48 valid frames
    "tiny": dict(mice=(("dynamic90001-1-1", 23, "old"), ("dynamic90002-4-2", 31, "new"),
                       ("dynamic90003-2-7", 40, "old"), ("dynamic90004-3-3", 27, "new"),
                       ("dynamic90005-1-4", 19, "control")),
                 heldout=("dynamic90003-2-7", "dynamic90004-3-3")),
    # the demo training: 4 training mice of 48 train trials (40 videos shared by all), 2 held out, 1 control
    "demo": dict(mice=(("dynamic90101-1-1", 83, "old"), ("dynamic90102-2-3", 127, "new"),
                       ("dynamic90103-3-2", 164, "old"), ("dynamic90104-1-5", 196, "new"),
                       ("dynamic90105-2-2", 109, "old"), ("dynamic90106-4-1", 141, "new"),
                       ("dynamic90107-1-3", 72, "control")),
                 heldout=("dynamic90105-2-2", "dynamic90106-4-1"),
                 t_valid=80, t_pad=84, n_shared_train=40, n_unique_train=8, n_oracle_videos=3,
                 oracle_repeats=4, n_main_test_videos=2),
}
# the demo's mice, tiers and sizes (prefixes 90201..90207) from the "filters" family
SYNTH_PRESETS["demo2"] = {
    **SYNTH_PRESETS["demo"], "family": "filters",
    "mice": tuple((p.replace("dynamic901", "dynamic902"), n, k) for p, n, k in SYNTH_PRESETS["demo"]["mice"]),
    "heldout": tuple(p.replace("dynamic901", "dynamic902") for p in SYNTH_PRESETS["demo"]["heldout"])}


STAT_NAMES = ("mean", "std", "min", "max", "median")


_STAT = {"mean": np.mean, "std": np.std, "min": np.min, "max": np.max, "median": np.median}


_NANSTAT = {"mean": np.nanmean, "std": np.nanstd, "min": np.nanmin, "max": np.nanmax, "median": np.nanmedian}


STATS_CHUNK_BYTES = 1 << 26


H, W = 36, 64                          # the written video frames (the reader resizes them)


RF_TYPES = ("simple", "complex", "centre_surround", "luminance")    # rf_type codes 0..3 in the truth


RETINOTOPY_PX_PER_UM = 0.06            # about 60 px per 1000 um of cortex, one orientation in every mouse


SILENT_GAIN = 1e-3                     # family "filters": gain of the near-silent neurons


TEMPORAL_TAPS = 20                     # length of the causal biphasic temporal filters (frames)


def _smooth_noise(rng: np.random.Generator, shape, sigma: float = 3.0) -> np.ndarray:
    """Gaussian-smoothed white noise along the last axis, z-scored along it."""
    x = gaussian_filter1d(rng.standard_normal(shape), sigma, axis=-1)
    return (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)


def _bases(K: int, H: int = 36, W: int = 64) -> np.ndarray:
    """(K, H, W) spatial bases, max 1: Gaussian blobs (even k) and Gabor patches (odd k) side by side.
    Blobs change the mean grey level, so videos land in different hash buckets, as natural videos do."""
    y, x = np.mgrid[:H, :W].astype(np.float64)
    sigma = W / (2.5 * K)
    out = []
    for k in range(K):
        cy, cx, theta = H * (0.35 + 0.3 * (k % 2)), W * (k + 0.5) / K, np.pi * k / K
        envelope = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma ** 2))
        u = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
        out.append(envelope if k % 2 == 0 else envelope * np.cos(2 * np.pi * u / (2.5 * sigma)))
    return np.stack(out)


def _statistics(stack: np.ndarray, per_frame: bool) -> dict[str, np.ndarray]:
    """NaN-aware statistics over the trials of a (n, ..., T_pad) stack. per_frame: (..., T_pad), frames that
    no trial covers filled with the statistic pooled over covered frames (no NaN in the files); else (...)."""
    covered = ~np.isnan(stack).all(axis=tuple(range(stack.ndim - 1)))
    x = np.ascontiguousarray(np.moveaxis(stack[..., covered], 0, -1))    # (..., frames, n): fast reductions
    out = {}
    for name, f in (_NANSTAT if np.isnan(x).any() else _STAT).items():     # nan-versions are much slower
        pooled = f(x.reshape(x.shape[:-2] + (-1,)), axis=-1)
        if per_frame:
            frame = np.repeat(pooled[..., None], stack.shape[-1], axis=-1)
            frame[..., covered] = f(x, axis=-1)
            pooled = frame
        out[name] = pooled
    return out


def _write_statistics(folder: str, train: list[int], layout: str, dtype: str) -> None:
    """meta/statistics/<key>/all/<stat>.npy over the train trials, read back in chunks of rows (pixel rows,
    neurons, channels) so memory stays small. per_neuron layout: responses (N,), behavior and pupil_center
    (2,), videos one scalar (that one holds every train video in memory: meant for small test sets)."""
    for key in DATA_KEYS:
        arrays = [np.load(os.path.join(folder, "data", key, f"{i}.npy"), mmap_mode="r") for i in train]
        if layout == "per_neuron" and key == "videos":
            stats = _statistics(np.stack(arrays).reshape(1, -1), per_frame=False)
        else:
            step = max(1, STATS_CHUNK_BYTES // (arrays[0][0].nbytes * len(arrays)))
            chunks = [_statistics(np.stack([a[r:r + step] for a in arrays]), layout == "per_frame")
                      for r in range(0, len(arrays[0]), step)]
            stats = {name: np.concatenate([c[name] for c in chunks]) for name in STAT_NAMES}
        out = os.path.join(folder, "meta", "statistics", key, "all")
        os.makedirs(out)
        for name, value in stats.items():
            np.save(os.path.join(out, f"{name}.npy"), np.asarray(value, dtype=dtype))


def _synth_slots(spec: SynthSpec, m: int, kind: str, rng: np.random.Generator) -> list[tuple[int, str]]:
    """Mouse m's (stimulus id, tier) per trial index, shuffled; trial 0 is never `none` (id -1)."""
    shared = spec.n_shared_train
    oracle = range(shared, shared + spec.n_oracle_videos)
    main = range(oracle.stop, oracle.stop + spec.n_main_test_videos)
    bonus = range(main.stop, main.stop + spec.n_bonus_videos)
    unique = range(bonus.stop + m * spec.n_unique_train, bonus.stop + (m + 1) * spec.n_unique_train)
    slots = [(s, "train") for s in itertools.chain(range(shared), unique)]
    slots += [(s, "oracle") for s in oracle for _ in range(spec.oracle_repeats)]
    for videos, live_final in ((main, TEST_TIERS[:2]), (bonus, TEST_TIERS[2:])):     # repeats alternate
        slots += [(s, live_final[r % 2]) for s in videos for r in range(spec.test_repeats)]
    slots += [(-1, "none")] * spec.none_trials[kind]
    slots = [slots[k] for k in rng.permutation(len(slots))]
    if slots[0][1] == "none":
        k = next(k for k, (_, tier) in enumerate(slots) if tier != "none")
        slots[0], slots[k] = slots[k], slots[0]
    return slots


def _check_spec(spec: SynthSpec) -> None:
    prefixes = [p for p, _, _ in spec.mice]
    problems = [f"heldout {h!r} is not one of the mice" for h in spec.heldout if h not in prefixes]
    problems += [f"mouse {p!r}: kind {k!r} is not old, new or control" for p, _, k in spec.mice
                 if k not in spec.none_trials]
    problems += [f"mouse {p!r}: {n} neurons, need more than {spec.silent_neurons} (the silent ones)"
                 for p, n, _ in spec.mice if n <= spec.silent_neurons]
    if len(set(prefixes)) != len(prefixes):
        problems.append(f"duplicate mouse prefixes {prefixes}")
    if spec.t_pad < spec.t_valid:
        problems.append(f"t_pad {spec.t_pad} < t_valid {spec.t_valid}")
    if spec.stats_layout not in ("per_frame", "per_neuron"):
        problems.append(f"stats_layout {spec.stats_layout!r} is not per_frame or per_neuron")
    if spec.dtype not in ("float32", "float64"):
        problems.append(f"dtype {spec.dtype!r} is not float32 or float64")
    if spec.family not in _FAMILIES:
        problems.append(f"family {spec.family!r} is not {' or '.join(_FAMILIES)}")
    if len(spec.rf_types) != len(RF_TYPES) or min(spec.rf_types) < 0 or sum(spec.rf_types) <= 0:
        problems.append(f"rf_types {spec.rf_types}: {len(RF_TYPES)} non-negative fractions {RF_TYPES}")
    for name in ("rf_sigma_px", "noise_shape"):
        low, high = getattr(spec, name)
        if not 0 < low <= high:
            problems.append(f"{name} {getattr(spec, name)}: need 0 < low <= high")
    if not (0 <= spec.silent_fraction <= 1 and 0 <= spec.dropout_prob < 1):
        problems.append("silent_fraction must be in [0, 1] and dropout_prob in [0, 1)")
    if min(spec.window_offset_px, spec.retinotopy_scatter_px, spec.gain_log_sd, spec.state_frames) < 0:
        problems.append("window_offset_px, retinotopy_scatter_px, gain_log_sd and state_frames must be >= 0")
    if problems:
        raise ValueError("synthetic spec: " + "; ".join(problems))


def write_synthetic(root: str, preset: str = "tiny", seed: int = 0, **overrides) -> list[str]:
    """Write mouse folders in the Sensorium 2023 format under root, plus root/_synthetic_truth/{truth.npz,
    config.json}; return the mouse folders. overrides: any SynthSpec field. Same (preset, seed, overrides)
    -> same bytes. Written to a temp folder beside root and renamed: never half a dataset.

    family "latent" (per stimulus s, mouse m): z_s (K, T) smooth z-scored noise from (seed, s); video =
    clip(round(128 + 40 * sum_k z_s,k B_k + frozen noise), 0, 255); rate = softplus(C_m z_s(t - lag) + b_m)
    * g_m; responses = rate * Gamma(4, 1/4) noise, fresh per trial. Control mice use their own z per trial.

    family "filters": see _movie (videos, from (seed, s)) and _FilterMouse (receptive fields, retinotopy,
    behavioural state, gains, noise); a control mouse responds to a private never-shown movie per trial.
    """
    spec = synthetic_spec(SynthSpec, SYNTH_PRESETS, preset, overrides)
    _check_spec(spec)
    return write_new_folder(root, lambda tmp: _write_synthetic(tmp, spec, preset, seed))


def _spec_dict(spec: SynthSpec) -> dict:
    """The spec as written (folder digests, config.json); family "latent" without the "filters" fields, so
    that its bytes are those written before the second family existed."""
    d = dataclasses.asdict(spec)
    return {k: v for k, v in d.items() if k not in _FILTER_FIELDS} if spec.family == "latent" else d


def _jittered(video: np.ndarray, jitter: int, rng: np.random.Generator) -> np.ndarray:
    """This copy of a video, with ±jitter grey levels of noise (none if 0)."""
    if not jitter:
        return video
    return np.clip(video + rng.integers(-jitter, jitter + 1, video.shape), 0, 255)


def _write_synthetic(out: str, spec: SynthSpec, preset: str, seed: int) -> list[str]:
    """Both families: the family gives the videos, shared truth and a generator per mouse; this writes the
    folders, tiers, statistics and truth."""
    T_pad = spec.t_pad
    stim_kind = (["train_shared"] * spec.n_shared_train + ["oracle"] * spec.n_oracle_videos
                 + ["main_test"] * spec.n_main_test_videos + ["bonus"] * spec.n_bonus_videos
                 + ["train_unique"] * (spec.n_unique_train * len(spec.mice)))
    bonus_frames = round(spec.bonus_fraction * spec.t_valid)
    stim_frames = [bonus_frames if k == "bonus" else spec.t_valid for k in stim_kind]
    family = _FAMILIES[spec.family](spec, seed, stim_kind, stim_frames)
    spec_json = json.dumps(_spec_dict(spec), sort_keys=True)
    truth = dict(family.truth)
    mice_info, tiers_of, names = {}, {}, []
    for m, (prefix, N, kind) in enumerate(spec.mice):
        digest = hashlib.md5(f"{spec_json} {seed} {kind}".encode()).hexdigest()
        name = f"{prefix}-Video-{digest}"
        folder = os.path.join(out, name)
        for key in DATA_KEYS:
            os.makedirs(os.path.join(folder, "data", key))
        for sub in ("trials", "neurons"):
            os.makedirs(os.path.join(folder, "meta", sub))
        slots = _synth_slots(spec, m, kind, np.random.default_rng([seed, 4, m]))
        animal = family.mouse(m, N, kind, slots)
        hidden = kind == "new"
        traces = []
        for i, (s, tier) in enumerate(slots):
            if s < 0:
                traces.append(animal.no_trace)
                continue
            trial_rng = np.random.default_rng([seed, 5, m, i])
            responses, trace, video, behavior, pupil = animal.trial(i, s, trial_rng)
            traces.append(trace)
            responses = np.zeros((N, T_pad)) if hidden and tier in TEST_TIERS else _pad(responses, T_pad)
            # behavior: pupil dilation and running speed, not NaN-padded (as released)
            for key, a in (("videos", _pad(video, T_pad)), ("responses", responses), ("behavior", behavior),
                           ("pupil_center", _pad(pupil, T_pad))):
                np.save(os.path.join(folder, "data", key, f"{i}.npy"), a.astype(spec.dtype))
        np.save(os.path.join(folder, "meta", "trials", "tiers.npy"), np.array([t for _, t in slots]))
        np.save(os.path.join(folder, "meta", "neurons", "unit_ids.npy"), np.arange(1, N + 1, dtype=np.int64))
        np.save(os.path.join(folder, "meta", "neurons", "cell_motor_coordinates.npy"),
                animal.coords.round().astype(np.int64))
        train = [i for i, (_, t) in enumerate(slots) if t == "train"]
        _write_statistics(folder, train, spec.stats_layout, spec.dtype)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"links": {}}, f)                   # the reference loaders write it; pre-create it
        role = "control" if kind == "control" else "heldout" if prefix in spec.heldout else "train"
        mice_info[name] = {"prefix": prefix, "kind": kind, "neurons": N, "role": role,
                           "hidden_tiers": sorted({t for _, t in slots if t in TEST_TIERS}) if hidden else []}
        truth |= {f"{name}/stimulus_of_trial": np.array([s for s, _ in slots], dtype=np.int64),
                  f"{name}/{family.trace_key}": _nan_stack(traces, max(stim_frames))}
        truth |= {f"{name}/{k}": v for k, v in animal.truth.items()}
        tiers_of[name] = [t for _, t in slots]
        names.append(name)
    _write_truth(out, truth, names, tiers_of, mice_info,
                 {"preset": preset, "seed": seed, "spec": _spec_dict(spec),
                  "lag": spec.lag if spec.family == "latent" else None})     # filters: rf_peak_lag per neuron
    return sorted(names)


def _write_truth(out: str, truth: dict, names: list[str], tiers_of: dict, mice_info: dict,
                 head: dict) -> None:
    """root/_synthetic_truth: truth.npz (the arrays) and config.json (head, mice, roles, the expected pairs
    and repeats)."""
    stim_of = {n: truth[f"{n}/stimulus_of_trial"] for n in names}
    expected_pairs = []
    for a, b in itertools.combinations(sorted(names), 2):
        both = [[i, j] for i, s in enumerate(stim_of[a]) if s >= 0
                for j in np.flatnonzero(stim_of[b] == s).tolist()]
        train = [[i, j] for i, j in both if tiers_of[a][i] == tiers_of[b][j] == "train"]
        expected_pairs.append({"a": a, "b": b, "trials": both, "train_trials": train})
    expected_repeats = {}
    for n in names:
        groups = defaultdict(list)
        for i, s in enumerate(stim_of[n].tolist()):
            if s >= 0:
                groups[s].append(i)
        expected_repeats[n] = sorted(g for g in groups.values() if len(g) > 1)
    by_role = {r: sorted(n for n in names if mice_info[n]["role"] == r)
               for r in ("train", "heldout", "control")}
    os.makedirs(os.path.join(out, TRUTH_DIR))
    save_npz(os.path.join(out, TRUTH_DIR, "truth.npz"), truth)
    with open(os.path.join(out, TRUTH_DIR, "config.json"), "w") as f:
        json.dump({**head, "mice": mice_info, **by_role, "pairs": expected_pairs,
                   "repeats": expected_repeats}, f, indent=1, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# family "latent": one shared stimulus latent
# ---------------------------------------------------------------------------------------------

class _LatentFamily:
    """Videos and responses from one shared low-dimensional latent per stimulus (write_synthetic)."""

    trace_key = "latent_of_trial"

    def __init__(self, spec: SynthSpec, seed: int, stim_kind: list[str], stim_frames: list[int]):
        K = spec.n_latent
        self.spec, self.seed = spec, seed
        bases = _bases(K, H, W)
        self.z = [_smooth_noise(np.random.default_rng([seed, 1, s]), (K, T))
                  for s, T in enumerate(stim_frames)]
        self.videos = [np.clip(np.round(128 + 40 * np.einsum("kt,khw->hwt", self.z[s], bases)
                                        + 5 * np.random.default_rng([seed, 2, s]).standard_normal((H, W, T))),
                               0, 255) for s, T in enumerate(stim_frames)]
        self.truth = {"bases": bases.astype(np.float32), "stimulus_kind": np.array(stim_kind),
                      "stimulus_frames": np.array(stim_frames, dtype=np.int64), "lag": np.array(spec.lag),
                      "z": _nan_stack(self.z, max(stim_frames))}

    def mouse(self, m: int, N: int, kind: str, slots: list) -> _LatentMouse:
        return _LatentMouse(self, m, N, kind)


class _LatentMouse:
    def __init__(self, family: _LatentFamily, m: int, N: int, kind: str):
        spec, K = family.spec, family.spec.n_latent
        self.family, self.kind = family, kind
        rng = np.random.default_rng([family.seed, 3, m])
        self.C = rng.normal(0, 1 / np.sqrt(K), (N, K))
        self.bias = np.exp(rng.normal(-0.5, 0.5, N))
        self.gain = np.exp(rng.normal(0.5, 0.7, N))                      # log-normal: stds differ by neuron
        self.gain[rng.choice(N, spec.silent_neurons, replace=False)] = 1e-4  # at random: order says nothing
        self.coords = np.concatenate([rng.uniform(-1100, 1100, (N, 2)), rng.uniform(100, 400, (N, 1))], 1)
        self.truth = {"C": self.C, "b": self.bias, "g": self.gain}
        self.no_trace = np.zeros((K, 0))

    def trial(self, i: int, s: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """(responses (N, T), latent (K, T), video (H, W, T), behavior (2, T_pad), pupil (2, T))."""
        f, spec = self.family, self.family.spec
        T, K = f.videos[s].shape[-1], spec.n_latent
        latent = _smooth_noise(rng, (K, T)) if self.kind == "control" else f.z[s]
        lagged = np.concatenate([np.zeros((K, spec.lag)), latent[:, :T - spec.lag]], 1)
        rate = np.logaddexp(0, self.C @ lagged + self.bias[:, None]) * self.gain[:, None]      # softplus
        responses = rate * rng.gamma(4.0, 0.25, rate.shape)
        video = _jittered(f.videos[s], spec.video_jitter, rng)
        # pupil dilation and running speed: independent of the stimulus
        behavior = np.stack([50 + 5 * _smooth_noise(rng, spec.t_pad),
                             2 * np.abs(_smooth_noise(rng, spec.t_pad))])
        return responses, latent, video, behavior, 150 + 3 * _smooth_noise(rng, (2, T))


# ---------------------------------------------------------------------------------------------
# family "filters": receptive fields on naturalistic movies, retinotopy, a private state
# ---------------------------------------------------------------------------------------------

def _movie(rng: np.random.Generator, T: int) -> np.ndarray:
    """(H, W, T) naturalistic movie, whole grey levels in 0..255: a pink (1/f^1.3 amplitude) noise texture
    drifting at a random velocity, plus 1-3 moving oriented edges or drifting Gabor patches, under a smooth
    modulation of global luminance and contrast."""
    th, tw = 2 * H, 2 * W                                    # periodic texture, cropped: no visible wrap
    fy, fx = np.fft.fftfreq(th)[:, None], np.fft.rfftfreq(tw)[None, :]
    f = np.hypot(fy, fx)
    f[0, 0] = np.inf
    spectrum = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / f ** 1.3
    t = np.arange(T)
    speed, direction = rng.uniform(0.2, 1.2), rng.uniform(0, 2 * np.pi)
    dx, dy = (speed * np.cos(direction) * t)[:, None, None], (speed * np.sin(direction) * t)[:, None, None]
    texture = np.fft.irfft2(spectrum * np.exp(-2j * np.pi * (fy * dy + fx * dx)), s=(th, tw))[:, :H, :W]
    texture /= np.fft.irfft2(spectrum, s=(th, tw)).std()
    y, x = np.mgrid[:H, :W].astype(np.float64)
    objects = np.zeros((T, H, W))
    for _ in range(rng.integers(1, 4)):
        theta, amplitude = rng.uniform(0, np.pi), rng.uniform(1.2, 2.2) * rng.choice((-1.0, 1.0))
        start, velocity = rng.uniform((0, 0), (W, H)), rng.normal(0, 0.4, 2)
        cx, cy = (start[0] + velocity[0] * t)[:, None, None], (start[1] + velocity[1] * t)[:, None, None]
        u = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
        r2 = (x - cx) ** 2 + (y - cy) ** 2
        if rng.random() < 0.5:                                      # a Gabor patch, its phase drifting
            sigma, wavelength = rng.uniform(3, 8), rng.uniform(6, 20)
            phase = (rng.uniform(0, 2 * np.pi) + rng.uniform(-0.4, 0.4) * t)[:, None, None]
            objects += amplitude * np.exp(-r2 / (2 * sigma ** 2)) * np.cos(2 * np.pi * u / wavelength + phase)
        else:                                                       # a soft edge under a broad window
            objects += amplitude * np.tanh(u / 1.5) * np.exp(-r2 / (2 * 14.0 ** 2))
    luminance = 20 * _smooth_noise(rng, T, 8.0)
    contrast = np.exp(0.35 * _smooth_noise(rng, T, 8.0))
    frames = 128 + luminance[:, None, None] + 28 * contrast[:, None, None] * (texture + objects)
    return np.clip(np.round(frames), 0, 255).transpose(1, 2, 0)


def _temporal_kernels(peak: np.ndarray) -> np.ndarray:
    """(n, TEMPORAL_TAPS) causal biphasic filters, tap k = frame t - k, peaking at `peak` frames (n,):
    sin(pi k / 2p) exp(-k / 2p) (peak at 0.80 p) up to its second zero, unit L2 norm."""
    p = peak[:, None] / 0.8
    k = np.arange(TEMPORAL_TAPS)[None, :]
    h = np.where(k <= 4 * p, np.sin(np.pi * k / (2 * p)) * np.exp(-k / (2 * p)), 0.0)
    return h / np.linalg.norm(h, axis=1, keepdims=True)


class _FilterFamily:
    """Frozen naturalistic movies (from (seed, s), identical in every mouse and repeat); _FilterMouse
    turns them into responses."""

    trace_key = "state_of_trial"

    def __init__(self, spec: SynthSpec, seed: int, stim_kind: list[str], stim_frames: list[int]):
        self.spec, self.seed = spec, seed
        self.videos = [_movie(np.random.default_rng([seed, 11, s]), T) for s, T in enumerate(stim_frames)]
        self.truth = {"stimulus_kind": np.array(stim_kind),
                      "stimulus_frames": np.array(stim_frames, dtype=np.int64),
                      "rf_types": np.array(RF_TYPES)}

    def mouse(self, m: int, N: int, kind: str, slots: list) -> _FilterMouse:
        return _FilterMouse(self, m, N, kind, slots)


class _FilterMouse:
    """One mouse of family "filters" (each item a SynthSpec knob):

    - retinotopy: cortical x, y uniform within ±400 um of the mouse's imaging-window centre (uniform within
      ±800 um), depth 100-400 um; RF centre (px) = screen centre + the mouse's visual offset
      (window_offset_px) + RETINOTOPY_PX_PER_UM * rotation(x, y - window centre) (the same orientation in
      every mouse, ±5% scale and ~3 degrees of rotation per mouse) + scatter (retinotopy_scatter_px),
      clipped to the screen;
    - filters (rf_types, rf_sigma_px): simple, complex, centre-surround or luminance (RF_TYPES) on the video
      in contrast units ((v - 128) / 64), then a causal biphasic temporal filter peaking 1-4 frames later;
      each neuron's output standardised over the stimuli this mouse is shown (each once) -> u (N, T);
    - state (state_strength, state_frames): a(t) = 0.6 * smooth z-scored noise + 0.8 * N(0, 1) per trial,
      private to the mouse and the trial; behavior row 0 pupil 50 + 8 a (smoothed) + noise, row 1 running
      3 softplus(2 a + noise); pupil_center 150 + (2, 1) a + smooth noise;
    - rate = g softplus(w u + b + s alpha a) exp(s beta a), s = state_strength, beta ~ N(0.4, 0.4), alpha ~
      N(0, 0.3); g log-normal (gain_log_sd), silent_fraction of neurons at SILENT_GAIN;
    - responses = rate * Gamma(k, 1/k) (k per neuron log-uniform in noise_shape), 0 with dropout_prob;
    - kind "control": u from a private never-shown movie per trial (standardised as the shown ones).
    """

    no_trace = np.zeros(0)

    def __init__(self, family: _FilterFamily, m: int, N: int, kind: str, slots: list):
        spec = family.spec
        self.family, self.kind, self.m, self.N = family, kind, m, N
        rng = np.random.default_rng([family.seed, 13, m])
        window = rng.uniform(-800, 800, 2)
        self.coords = np.concatenate([window + rng.uniform(-400, 400, (N, 2)), rng.uniform(100, 400, (N, 1))],
                                     1).round()
        offset = rng.normal(0, spec.window_offset_px, 2)
        scale, angle = RETINOTOPY_PX_PER_UM * np.exp(rng.normal(0, 0.05)), rng.normal(0, 0.05)
        cos, sin = np.cos(angle), np.sin(angle)
        rotation = np.array([[cos, -sin], [sin, cos]]) @ np.diag([1, -1])      # cortical +y: up on screen
        centre = (np.array([W / 2, H / 2]) + offset + scale * (self.coords[:, :2] - window) @ rotation.T
                  + rng.normal(0, spec.retinotopy_scatter_px, (N, 2)))
        centre = np.clip(centre, 0, [W - 1, H - 1])
        fractions = np.asarray(spec.rf_types, np.float64)
        types = rng.choice(len(RF_TYPES), N, p=fractions / fractions.sum())
        sigma, theta = rng.uniform(*spec.rf_sigma_px, N), rng.uniform(0, np.pi, N)
        phase, wavelength = rng.uniform(0, 2 * np.pi, N), rng.uniform(2, 4, N) * sigma   # about 1-2 cycles
        sign, peak = rng.choice((-1.0, 1.0), N), rng.uniform(1, 4, N)
        gain = np.exp(rng.normal(0.5, spec.gain_log_sd, N))
        gain[rng.permutation(N)[:round(spec.silent_fraction * N)]] = SILENT_GAIN
        weight, bias = np.exp(rng.normal(0.4, 0.2, N)), rng.normal(-1.0, 0.5, N)
        beta, alpha = rng.normal(0.4, 0.4, N), rng.normal(0, 0.3, N)
        shape = np.exp(rng.uniform(*np.log(spec.noise_shape), N))
        self.params = dict(gain=gain, weight=weight, bias=bias, beta=beta, alpha=alpha, shape=shape)
        self.truth = {"rf_type": types, "rf_centre": centre, "rf_sigma": sigma, "rf_theta": theta,
                      "rf_phase": phase, "rf_wavelength": wavelength, "rf_sign": sign, "rf_peak_lag": peak,
                      "g": gain, "w": weight, "b": bias, "beta": beta, "alpha": alpha, "noise_shape": shape,
                      "window_centre": window, "visual_offset": offset, "retinotopy_scale": np.array(scale),
                      "retinotopy_angle": np.array(angle)}
        # spatial filters (rows: one per neuron, then the quadrature partners of the complex ones)
        y, x = np.mgrid[:H, :W].reshape(2, 1, -1).astype(np.float64)
        dx, dy = x - centre[:, :1], y - centre[:, 1:]
        r2, s2 = dx ** 2 + dy ** 2, sigma[:, None] ** 2
        envelope = np.exp(-r2 / (2 * s2))
        u = dx * np.cos(theta)[:, None] + dy * np.sin(theta)[:, None]
        carrier = 2 * np.pi * u / wavelength[:, None]
        gabor = [envelope * np.cos(carrier + phase[:, None]), envelope * np.sin(carrier + phase[:, None])]
        gabor = [g - envelope * g.sum(1, keepdims=True) / envelope.sum(1, keepdims=True)   # no DC
                 for g in gabor]
        dog = envelope / (2 * np.pi * s2) - np.exp(-r2 / (8 * s2)) / (8 * np.pi * s2)
        mean_luminance = envelope / envelope.sum(1, keepdims=True)
        main = np.select([types[:, None] <= 1, types[:, None] == 2], [gabor[0], sign[:, None] * dog],
                         sign[:, None] * mean_luminance)
        self.complex = np.flatnonzero(types == 1)
        filters = np.concatenate([main, gabor[1][self.complex]])
        self.filters = filters / np.linalg.norm(filters, axis=1, keepdims=True)
        self.kernels = _temporal_kernels(peak)[np.concatenate([np.arange(N), self.complex])]
        shown = sorted({s for s, _ in slots if s >= 0})
        drive = self._drive([family.videos[s] for s in shown])
        together = np.concatenate(drive, axis=1)
        self.mean, self.std = together.mean(1, keepdims=True), together.std(1, keepdims=True) + 1e-12
        self.u = {s: (d - self.mean) / self.std for s, d in zip(shown, drive, strict=True)}

    def _drive(self, videos: list[np.ndarray]) -> list[np.ndarray]:
        """Filter outputs (N, T) of (H, W, T) videos, before standardisation: one matrix product for all."""
        frames = np.concatenate([v.reshape(H * W, -1) for v in videos], axis=1)
        linear = self.filters @ ((frames - 128) / 64)                              # (rows, frames)
        out, start = [], 0
        for v in videos:
            T = v.shape[-1]
            x = np.concatenate([np.zeros((len(linear), TEMPORAL_TAPS - 1)), linear[:, start:start + T]], 1)
            windows = np.lib.stride_tricks.sliding_window_view(x, TEMPORAL_TAPS, axis=1)  # (rows, T, taps)
            filtered = np.einsum("rtk,rk->rt", windows, self.kernels[:, ::-1])
            u = filtered[:self.N]
            u[self.complex] = u[self.complex] ** 2 + filtered[self.N:] ** 2     # energy of the pair
            out.append(u)
            start += T
        return out

    def trial(self, i: int, s: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """(responses (N, T), state (T,), video (H, W, T), behavior (2, T_pad), pupil (2, T)) of a trial."""
        spec, p = self.family.spec, self.params
        video = self.family.videos[s]
        T, T_pad = video.shape[-1], spec.t_pad
        a = 0.6 * _smooth_noise(rng, T_pad, spec.state_frames) + 0.8 * rng.standard_normal()
        if self.kind == "control":
            private = _movie(np.random.default_rng([self.family.seed, 12, self.m, i]), T)
            u = (self._drive([private])[0] - self.mean) / self.std
        else:
            u = self.u[s]
        state = spec.state_strength * a[:T]
        rate = (p["gain"][:, None] * np.logaddexp(0, p["weight"][:, None] * u + p["bias"][:, None]
                                                  + p["alpha"][:, None] * state)
                * np.exp(p["beta"][:, None] * state))
        k = p["shape"][:, None]
        responses = rate * rng.gamma(k, 1 / k, rate.shape) * (rng.random(rate.shape) >= spec.dropout_prob)
        video = _jittered(video, spec.video_jitter, rng)
        behavior = np.stack([50 + 8 * gaussian_filter1d(a, 2.0) + 0.5 * rng.standard_normal(T_pad),
                             3 * np.logaddexp(0, 2 * a + 0.5 * rng.standard_normal(T_pad))])
        pupil = 150 + np.array([[2.0], [1.0]]) * a[:T] + _smooth_noise(rng, (2, T))
        return responses, a[:T], video, behavior, pupil


_FAMILIES = {"latent": _LatentFamily, "filters": _FilterFamily}


def _pad(a: np.ndarray, t_pad: int) -> np.ndarray:
    """NaN-pad the last axis to t_pad frames."""
    return np.concatenate([a, np.full(a.shape[:-1] + (t_pad - a.shape[-1],), np.nan)], -1)


def _nan_stack(arrays: list[np.ndarray], t: int) -> np.ndarray:
    return np.stack([_pad(a.astype(np.float64), t) for a in arrays])


def read_synthetic_truth(root: str) -> dict:
    """root/_synthetic_truth/config.json as a dict (keys train, heldout, control, mice, pairs, repeats, ...)
    plus "arrays": the contents of truth.npz (stimulus_kind, stimulus_frames, <mouse>/stimulus_of_trial;
    family "latent": bases, z, <mouse>/latent_of_trial, C, b, g; family "filters": rf_types and per mouse
    state_of_trial and the RF, gain, state and noise parameters of _FilterMouse)."""
    folder = os.path.join(root, TRUTH_DIR)
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing; {root} is not a dataset written by write_synthetic")
    with open(path) as f:
        truth = json.load(f)
    with np.load(os.path.join(folder, "truth.npz"), allow_pickle=False) as f:
        truth["arrays"] = {k: f[k] for k in f.files}
    return truth
