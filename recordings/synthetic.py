"""Synthetic dataset in the Sensorium 2023 folder format, from a known shared stimulus latent
(docs/data_formats.md §5), with its ground truth beside it."""

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
    latent of its own per trial, independent of the stimulus: a negative control)."""

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


STAT_NAMES = ("mean", "std", "min", "max", "median")


_STAT = {"mean": np.mean, "std": np.std, "min": np.min, "max": np.max, "median": np.median}


_NANSTAT = {"mean": np.nanmean, "std": np.nanstd, "min": np.nanmin, "max": np.nanmax, "median": np.nanmedian}


STATS_CHUNK_BYTES = 1 << 26


def _smooth_noise(rng: np.random.Generator, shape: tuple, sigma: float = 3.0) -> np.ndarray:
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
    if problems:
        raise ValueError("synthetic spec: " + "; ".join(problems))


def write_synthetic(root: str, preset: str = "tiny", seed: int = 0, **overrides) -> list[str]:
    """Write mouse folders in the Sensorium 2023 format under root, plus root/_synthetic_truth/{truth.npz,
    config.json}; return the mouse folders. overrides: any SynthSpec field. Same (preset, seed, overrides)
    -> same bytes. Written to a temp folder beside root and renamed: never half a dataset.

    Model (per stimulus s, mouse m): z_s (K, T) smooth z-scored noise from (seed, s); video = clip(round(128
    + 40 * sum_k z_s,k B_k + frozen noise), 0, 255); rate = softplus(C_m z_s(t - lag) + b_m) * g_m; responses
    = rate * Gamma(4, 1/4) noise, fresh per trial. Control mice use their own z per trial instead of z_s.
    """
    spec = synthetic_spec(SynthSpec, SYNTH_PRESETS, preset, overrides)
    _check_spec(spec)
    return write_new_folder(root, lambda tmp: _write_synthetic(tmp, spec, preset, seed))


def _write_synthetic(out: str, spec: SynthSpec, preset: str, seed: int) -> list[str]:
    H, W, K, T_pad = 36, 64, spec.n_latent, spec.t_pad
    stim_kind = (["train_shared"] * spec.n_shared_train + ["oracle"] * spec.n_oracle_videos
                 + ["main_test"] * spec.n_main_test_videos + ["bonus"] * spec.n_bonus_videos
                 + ["train_unique"] * (spec.n_unique_train * len(spec.mice)))
    bonus_frames = round(spec.bonus_fraction * spec.t_valid)
    stim_frames = [bonus_frames if k == "bonus" else spec.t_valid for k in stim_kind]
    bases = _bases(K, H, W)
    z = [_smooth_noise(np.random.default_rng([seed, 1, s]), (K, T)) for s, T in enumerate(stim_frames)]
    videos = [np.clip(np.round(128 + 40 * np.einsum("kt,khw->hwt", z[s], bases)
                               + 5 * np.random.default_rng([seed, 2, s]).standard_normal((H, W, T))), 0, 255)
              for s, T in enumerate(stim_frames)]
    spec_json = json.dumps(dataclasses.asdict(spec), sort_keys=True)
    truth = {"bases": bases.astype(np.float32), "stimulus_kind": np.array(stim_kind),
             "stimulus_frames": np.array(stim_frames, dtype=np.int64), "lag": np.array(spec.lag),
             "z": _nan_stack(z, max(stim_frames))}
    mice_info, tiers_of, names = {}, {}, []
    for m, (prefix, N, kind) in enumerate(spec.mice):
        digest = hashlib.md5(f"{spec_json} {seed} {kind}".encode()).hexdigest()
        name = f"{prefix}-Video-{digest}"
        folder = os.path.join(out, name)
        for key in DATA_KEYS:
            os.makedirs(os.path.join(folder, "data", key))
        for sub in ("trials", "neurons"):
            os.makedirs(os.path.join(folder, "meta", sub))
        rng = np.random.default_rng([seed, 3, m])
        C = rng.normal(0, 1 / np.sqrt(K), (N, K))
        bias = np.exp(rng.normal(-0.5, 0.5, N))
        gain = np.exp(rng.normal(0.5, 0.7, N))                           # log-normal: stds differ by neuron
        gain[rng.choice(N, spec.silent_neurons, replace=False)] = 1e-4  # at random: the order says nothing
        coords = np.concatenate([rng.uniform(-1100, 1100, (N, 2)), rng.uniform(100, 400, (N, 1))], 1)
        slots = _synth_slots(spec, m, kind, np.random.default_rng([seed, 4, m]))
        hidden = kind == "new"
        latents = []
        for i, (s, tier) in enumerate(slots):
            if s < 0:
                latents.append(np.zeros((K, 0)))
                continue
            T = stim_frames[s]
            trial_rng = np.random.default_rng([seed, 5, m, i])
            latent = _smooth_noise(trial_rng, (K, T)) if kind == "control" else z[s]
            latents.append(latent)
            lagged = np.concatenate([np.zeros((K, spec.lag)), latent[:, :T - spec.lag]], 1)
            rate = np.logaddexp(0, C @ lagged + bias[:, None]) * gain[:, None]      # softplus
            responses = _pad(rate * trial_rng.gamma(4.0, 0.25, rate.shape), T_pad)
            if hidden and tier in TEST_TIERS:
                responses = np.zeros((N, T_pad))
            video = videos[s]
            if spec.video_jitter:
                jitter = trial_rng.integers(-spec.video_jitter, spec.video_jitter + 1, video.shape)
                video = np.clip(video + jitter, 0, 255)
            # pupil dilation and running speed: independent of the stimulus, not NaN-padded (as released)
            behavior = np.stack([50 + 5 * _smooth_noise(trial_rng, T_pad),
                                 2 * np.abs(_smooth_noise(trial_rng, T_pad))])
            pupil = _pad(150 + 3 * _smooth_noise(trial_rng, (2, T)), T_pad)
            for key, a in (("videos", _pad(video, T_pad)), ("responses", responses), ("behavior", behavior),
                           ("pupil_center", pupil)):
                np.save(os.path.join(folder, "data", key, f"{i}.npy"), a.astype(spec.dtype))
        np.save(os.path.join(folder, "meta", "trials", "tiers.npy"), np.array([t for _, t in slots]))
        np.save(os.path.join(folder, "meta", "neurons", "unit_ids.npy"), np.arange(1, N + 1, dtype=np.int64))
        np.save(os.path.join(folder, "meta", "neurons", "cell_motor_coordinates.npy"),
                coords.round().astype(np.int64))
        train = [i for i, (_, t) in enumerate(slots) if t == "train"]
        _write_statistics(folder, train, spec.stats_layout, spec.dtype)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"links": {}}, f)                   # the reference loaders write it; pre-create it
        role = "control" if kind == "control" else "heldout" if prefix in spec.heldout else "train"
        mice_info[name] = {"prefix": prefix, "kind": kind, "neurons": N, "role": role,
                           "hidden_tiers": sorted({t for _, t in slots if t in TEST_TIERS}) if hidden else []}
        truth |= {f"{name}/stimulus_of_trial": np.array([s for s, _ in slots], dtype=np.int64),
                  f"{name}/latent_of_trial": _nan_stack(latents, max(stim_frames)),
                  f"{name}/C": C, f"{name}/b": bias, f"{name}/g": gain}
        tiers_of[name] = [t for _, t in slots]
        names.append(name)

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
        json.dump({"preset": preset, "seed": seed, "spec": dataclasses.asdict(spec), "lag": spec.lag,
                   "mice": mice_info, **by_role, "pairs": expected_pairs, "repeats": expected_repeats},
                  f, indent=1, sort_keys=True)
    return sorted(names)


def _pad(a: np.ndarray, t_pad: int) -> np.ndarray:
    """NaN-pad the last axis to t_pad frames."""
    return np.concatenate([a, np.full(a.shape[:-1] + (t_pad - a.shape[-1],), np.nan)], -1)


def _nan_stack(arrays: list[np.ndarray], t: int) -> np.ndarray:
    return np.stack([_pad(a.astype(np.float64), t) for a in arrays])


def read_synthetic_truth(root: str) -> dict:
    """root/_synthetic_truth/config.json as a dict (keys train, heldout, control, mice, pairs, repeats, ...)
    plus "arrays": the contents of truth.npz (bases, z, stimulus_kind, <mouse>/stimulus_of_trial, ...)."""
    folder = os.path.join(root, TRUTH_DIR)
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing; {root} is not a dataset written by write_synthetic")
    with open(path) as f:
        truth = json.load(f)
    with np.load(os.path.join(folder, "truth.npz"), allow_pickle=False) as f:
        truth["arrays"] = {k: f[k] for k in f.files}
    return truth
