"""python data.py synth OUT [--preset tiny|demo] [--seed S]
python data.py check DIR [DIR...] [--json]

Sensorium 2023 data: reader, normaliser, training/evaluation windows, stimulus identity from pixels,
and a synthetic dataset written in exactly the same folder format (docs/data_formats.md).

    mice = [Mouse(p) for p in find_mice(["/data/sensorium"])]      # mouse folders or their parent
    video, responses = mice[0].normalised(i)                       # (T, 32, 64), (T, N) float32
    loader = make_train_loader(mice, 16, 32, 2, seed=42, epoch=0)  # dict batches, one mouse each
    groups = stimulus_groups(mice)                                 # (mouse, trial) -> stimulus id

Also the one definition of the representations file (write_representations / read_representations)
that extract.py writes and the stats scripts read.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import zipfile
import zlib
from collections import defaultdict
from dataclasses import dataclass, field

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter1d
from tqdm import tqdm

import config


class DataError(Exception):
    """Bad input: the message is one line naming the file and what is wrong with it."""


# ---------------------------------------------------------------------------------------------
# Representations file: /<mouse>/<tier>/<trial>/{mu_x, logvar_x, mu_y, logvar_y, mu_p}
# ---------------------------------------------------------------------------------------------

REPS_FORMAT = "pnba-representations"
REPS_VERSION = 1
REPS_ARRAYS = ("mu_x", "logvar_x", "mu_y", "logvar_y", "mu_p")


@dataclass
class TrialRep:
    """Representations of one trial: arrays are float32 (frames, latent); mu_y/logvar_y may be absent."""

    mouse: str
    tier: str
    trial: int
    stimulus: int                 # global stimulus group id from pixel pairing (-1: unknown)
    valid_frames: int
    heldout: bool
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def write_representations(path: str, trials: list[TrialRep], attrs: dict) -> None:
    """Write trials to HDF5 at `path` atomically (config.atomic_path: temp file beside it, then rename).

    attrs: file attributes (e.g. checkpoint digest, config as a JSON string); non-str values are
    stored as JSON strings.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with config.atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = REPS_FORMAT
        f.attrs["version"] = REPS_VERSION
        for k, v in attrs.items():
            f.attrs[k] = v if isinstance(v, str) else json.dumps(v)
        for t in trials:
            mouse = f.require_group(t.mouse)
            mouse.attrs["heldout"] = bool(t.heldout)
            g = mouse.require_group(t.tier).create_group(str(t.trial))
            g.attrs["stimulus"] = int(t.stimulus)
            g.attrs["valid_frames"] = int(t.valid_frames)
            for name in REPS_ARRAYS:
                if t.arrays.get(name) is not None:
                    g.create_dataset(name, data=np.asarray(t.arrays[name], dtype=np.float32))


def open_hdf5(path: str, what: str = "file") -> h5py.File:
    """h5py.File(path, "r"); DataError with one line if it is missing or not readable HDF5."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such {what}")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({str(e).splitlines()[0]})") from None


def read_representations(path: str) -> tuple[list[TrialRep], dict]:
    """Read a file written by write_representations; DataError if it is missing or not ours."""
    with open_hdf5(path, "representations file") as f:
        if f.attrs.get("format") != REPS_FORMAT:
            raise DataError(f"{path}: not a PNBA representations file (no format={REPS_FORMAT!r} attribute)")
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        trials = []
        for mouse, mg in f.items():
            heldout = bool(mg.attrs.get("heldout", False))
            for tier, tg in mg.items():
                for trial, g in tg.items():
                    arrays = {n: g[n][()] for n in REPS_ARRAYS if n in g}
                    trials.append(TrialRep(mouse, tier, int(trial), int(g.attrs["stimulus"]),
                                           int(g.attrs["valid_frames"]), heldout, arrays))
    trials.sort(key=lambda t: (t.mouse, t.tier, t.trial))
    return trials, attrs


# ---------------------------------------------------------------------------------------------
# Reader: one Sensorium mouse folder, memory-mapped per trial
# ---------------------------------------------------------------------------------------------

DATA_KEYS = ("videos", "responses", "behavior", "pupil_center")
TEST_TIERS = ("live_test_main", "final_test_main", "live_test_bonus", "final_test_bonus")
HIDDEN_PROBE_NEURONS = 32     # rows read to recognise a zero-filled (hidden) response array


def _load(path: str, mmap: bool = True) -> np.ndarray:
    """np.load without pickles; DataError naming the file if it is missing or not a readable .npy."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        # numpy reads a file without the .npy magic as a pickle and says allow_pickle=True would load it:
        # advice never to follow for a damaged file
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise DataError(f"{path}: unreadable .npy (no .npy header: damaged, or another format)") \
                    from None
        if "allow_pickle" in str(e):
            raise DataError(f"{path}: holds Python objects (an object array); only numeric .npy arrays are "
                            "read, never pickles") from None
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: unreadable .npy ({reason})") from None


def _valid_length(a: np.ndarray, path: str, axes: tuple[str, ...]) -> int:
    """Frames before the NaN padding of an (..., T_pad) array, looking at every element (every neuron, every
    pixel): the padding is the frames after the last one holding a number. A NaN before that is a hole, not
    padding: DataError naming its frame and element (axes: names of the leading axes, for the message)."""
    nan = np.isnan(np.asarray(a)).reshape(-1, a.shape[-1])               # (elements, T_pad)
    numbers = np.flatnonzero(~nan.all(0))
    valid = int(numbers[-1]) + 1 if len(numbers) else 0
    holes = nan[:, :valid]
    if holes.any():
        t = int(np.flatnonzero(holes.any(0))[0])
        where = np.unravel_index(int(np.flatnonzero(holes[:, t])[0]), a.shape[:-1])
        element = ", ".join(f"{name} {int(k)}" for name, k in zip(axes, where, strict=True))
        raise DataError(f"{path}: NaN at frame {t} ({element}) inside the valid window (numbers follow it)")
    return valid


def response_precision(std: np.ndarray, floor: float = 0.01) -> np.ndarray:
    """Reference NeuroNormalizer precision, elementwise on the statistics array as given: 1/std, and
    1/threshold where std <= threshold = floor * nanmean(std) (NaN std counts as below)."""
    threshold = floor * np.nanmean(std)
    above = std > threshold
    return np.where(above, 1 / np.where(above, std, 1), 1 / threshold).astype(np.float32)


def _is_mouse(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "meta", "trials", "tiers.npy"))


def _looks_like_mouse(path: str) -> bool:
    """A folder with a mouse's data: a mouse folder, or one that lost its tiers.npy."""
    return any(os.path.isdir(os.path.join(path, "data", key)) for key in ("videos", "responses"))


def find_mice(paths: list[str]) -> list[str]:
    """Sorted mouse folders from paths that are mouse folders or folders holding mouse folders. A folder
    beside them with a mouse's data but no meta/trials/tiers.npy is an error, not skipped: a run would
    otherwise go on with fewer animals than the user gave it."""
    found = []
    for p in paths:
        p = os.path.normpath(p)
        if not os.path.isdir(p):
            raise DataError(f"{p}: no such folder")
        if _is_mouse(p):
            found.append(p)
            continue
        for d in sorted(os.listdir(p)):
            sub = os.path.join(p, d)
            if not _is_mouse(sub) and _looks_like_mouse(sub):
                raise DataError(f"{os.path.join(sub, 'meta', 'trials', 'tiers.npy')}: missing, but {sub} "
                                "holds a mouse's data/ (restore the file, or move the folder out)")
        subs = [os.path.join(p, d) for d in sorted(os.listdir(p)) if _is_mouse(os.path.join(p, d))]
        if not subs:
            raise DataError(f"{p}: not a Sensorium mouse folder (no meta/trials/tiers.npy) and holds none")
        found += subs
    found = sorted(set(found))
    by_name = defaultdict(list)
    for p in found:
        by_name[os.path.basename(p)].append(p)
    for name, ps in by_name.items():
        if len(ps) > 1:
            raise DataError(f"{ps[1]}: a second mouse folder named {name} (also {ps[0]})")
    return found


class Mouse:
    """One Sensorium 2023 mouse folder. Opening validates the metadata; trial arrays are memory-mapped
    on each access (RAM does not grow with the dataset); only valid lengths and hidden flags are cached.

    Trial i is the file number data/<key>/<i>.npy, indexed by meta/trials/tiers.npy ("none": no files).
    """

    def __init__(self, path: str, std_floor: float = 0.01, height: int = 32, width: int = 64):
        self.path = os.path.normpath(path)
        self.name = os.path.basename(self.path)
        self.height, self.width = height, width
        tiers_file = self._file("meta/trials/tiers.npy")
        if not os.path.isfile(tiers_file):
            raise DataError(f"{tiers_file}: missing, so {self.path} is not a Sensorium mouse folder")
        tiers = _load(tiers_file, mmap=False)
        if tiers.ndim != 1 or tiers.dtype.kind not in "US":
            raise DataError(f"{tiers_file}: expected a 1-D string array, found {tiers.dtype} {tiers.shape}")
        self.tiers = tiers.astype(str)
        self._trials = np.flatnonzero(self.tiers != "none")
        if len(self._trials) == 0:
            raise DataError(f"{tiers_file}: every trial is 'none'")

        std_file = self._file("meta/statistics/responses/all/std.npy")
        std = np.asarray(_load(std_file, mmap=False), dtype=np.float64)
        units_file = self._file("meta/neurons/unit_ids.npy")
        self.n_neurons = len(_load(units_file)) if os.path.isfile(units_file) else len(std)
        if std.ndim not in (1, 2) or len(std) != self.n_neurons:
            raise DataError(f"{std_file}: shape {std.shape} does not fit the {self.n_neurons} neurons of "
                            f"{units_file}; expected (N,), (N, 1) or (N, frames)")
        if not np.isfinite(np.nanmean(std)) or np.nanmean(std) <= 0:
            raise DataError(f"{std_file}: no positive finite std")
        self.precision = response_precision(std.reshape(self.n_neurons, -1), std_floor)  # (N, 1) | (N, T_pad)
        mean_file = self._file("meta/statistics/responses/all/mean.npy")
        self.mean_rate = None                  # (N,) normalised mean response over the train tier, if known
        if os.path.isfile(mean_file):
            mean = np.asarray(_load(mean_file, mmap=False), dtype=np.float64)
            if mean.size not in (self.n_neurons, self.precision.size) or len(mean) != self.n_neurons:
                raise DataError(f"{mean_file}: shape {mean.shape}, expected (N,), (N, 1) or the shape of "
                                f"std.npy beside it {std.shape}")
            normalised = mean.reshape(self.n_neurons, -1) * self.precision
            self.mean_rate = np.nan_to_num(np.nanmean(normalised, axis=1)).astype(np.float32)

        coords_file = self._file("meta/neurons/cell_motor_coordinates.npy")
        self.coords = None
        if os.path.isfile(coords_file):
            self.coords = np.asarray(_load(coords_file, mmap=False), dtype=np.float64)
            if self.coords.shape != (self.n_neurons, 3):
                raise DataError(f"{coords_file}: shape {self.coords.shape}, expected ({self.n_neurons}, 3)")

        for key in ("videos", "responses"):
            folder = self._file(f"data/{key}")
            if not os.path.isdir(folder):
                raise DataError(f"{folder}: missing")
            have = {f[:-4] for f in os.listdir(folder) if f.endswith(".npy")}
            missing = [i for i in self._trials if str(i) not in have]
            if missing:
                raise DataError(f"{folder}/{missing[0]}.npy: missing, but tiers.npy says "
                                f"{self.tiers[missing[0]]!r} ({len(missing)} missing in all)")
        self._shapes: dict[str, tuple] = {}
        video_shape = self._sibling_shape("videos")
        if len(video_shape) != 3:
            raise DataError(f"{self._file('data/videos')}: the trials' arrays have shape {video_shape}, "
                            "expected (height, width, frames)")
        self.t_pad = video_shape[-1]
        self._shapes["responses"] = (self.n_neurons, self.t_pad)
        for key in ("videos", "responses"):
            self._array(key, self._trials[0])
        if 1 < self.precision.shape[1] < self.t_pad:
            raise DataError(f"{std_file}: statistics for {self.precision.shape[1]} frames, but trials have "
                            f"{self.t_pad}")
        self._valid: dict[int, int] = {}
        self._hidden: dict[int, bool] = {}

    def __repr__(self) -> str:
        return f"Mouse({self.name!r}, {self.n_neurons} neurons, {len(self._trials)} trials)"

    def coords_tensor(self, device=None) -> torch.Tensor | None:
        """Cortical coordinates (N, 3) float32 on `device`, or None when the folder has none."""
        if self.coords is None:
            return None
        return torch.as_tensor(self.coords, dtype=torch.float32, device=device)

    def _file(self, rel: str) -> str:
        return os.path.join(self.path, rel)

    def _sibling_shape(self, key: str) -> tuple:
        """The shape every data/<key> array of this mouse must have: the one most of its first three trials
        have (headers only), so that one bad file among them is reported as itself, not its siblings."""
        if key not in self._shapes:
            shapes = [_load(self._file(f"data/{key}/{i}.npy")).shape for i in self._trials[:3]]
            self._shapes[key] = max(shapes, key=shapes.count)
        return self._shapes[key]

    def _array(self, key: str, i: int) -> np.ndarray:
        """data/<key>/<i>.npy memory-mapped, with its shape checked against its siblings."""
        path = self._file(f"data/{key}/{i}.npy")
        a, expected = _load(path), self._sibling_shape(key)
        if a.shape != expected:
            if key == "responses" and a.ndim == 2 and a.shape[1] == self.t_pad:
                raise DataError(f"{path}: {a.shape[0]} neurons, but meta/neurons and the statistics have "
                                f"{self.n_neurons}")
            raise DataError(f"{path}: shape {a.shape} disagrees with its siblings {expected}")
        return a

    def _finite(self, key: str, i: int, start: int, stop: int) -> np.ndarray:
        """Frames [start, stop) of data/<key>/<i>.npy as float32; DataError on NaN."""
        a = np.array(self._array(key, i)[..., start:stop], dtype=np.float32)     # a copy: off the mmap
        nan = np.isnan(a)
        if nan.any():
            t = start + int(np.flatnonzero(nan.reshape(-1, a.shape[-1]).any(0))[0])
            raise DataError(f"{self._file(f'data/{key}/{i}.npy')}: NaN at frame {t}, inside the valid frames")
        return a

    def trials(self, tiers=None, hidden: bool = True) -> np.ndarray:
        """Indices of trials with files (tier != "none"), optionally only of `tiers`, without hidden ones."""
        out = self._trials
        if tiers is not None:
            out = out[np.isin(self.tiers[out], [tiers] if isinstance(tiers, str) else list(tiers))]
        if not hidden:
            out = out[np.array([not self.is_hidden(int(i)) for i in out], dtype=bool)]
        return out

    def valid_frames(self, i: int) -> int:
        """Frames before the NaN padding: the minimum over videos and responses, as the reference CutVideos.
        Every neuron and pixel is read once (then cached): a NaN inside the valid window of any of them is a
        DataError naming it, never a shorter trial or a failure at some later training step."""
        i = int(i)
        if i not in self._valid:
            lengths = [_valid_length(self._array(key, i), self._file(f"data/{key}/{i}.npy"), axes)
                       for key, axes in (("videos", ("row", "column")), ("responses", ("neuron",)))]
            if min(lengths) == 0:
                raise DataError(f"{self._file(f'data/videos/{i}.npy')}: no valid frames (NaN from frame 0)")
            self._valid[i] = min(lengths)
        return self._valid[i]

    def is_hidden(self, i: int) -> bool:
        """True for a withheld test trial: responses zero-filled over the whole padded length (no NaN).
        Reads 32 evenly spaced neurons, not the whole array: a recorded trial is never exactly zero on all."""
        i = int(i)
        if i not in self._hidden:
            r = self._array("responses", i)
            rows = np.unique(np.linspace(0, len(r) - 1, HIDDEN_PROBE_NEURONS).astype(int))
            self._hidden[i] = not np.any(r[rows])       # NaN padding counts as non-zero
        return self._hidden[i]

    @property
    def hidden_tiers(self) -> list[str]:
        """Tiers whose every trial is hidden: never used for training, statistics or scoring."""
        tiers = sorted(set(self.tiers[self._trials].tolist()))
        return [t for t in tiers if all(self.is_hidden(int(i)) for i in self.trials([t]))]

    def raw(self, i: int) -> dict[str, np.ndarray]:
        """Trial i as stored, memory-mapped: videos (H, W, T), responses (N, T), pupil_center (2, T) cut to
        the T valid frames; behavior (2, T_pad) uncut (it has no NaN padding). DataError on a NaN inside the
        valid window of videos or responses (the model's inputs)."""
        T = self.valid_frames(i)
        out = {key: self._array(key, i) for key in DATA_KEYS}
        for key in ("videos", "responses", "pupil_center"):
            out[key] = out[key][..., :T]
        for key in ("videos", "responses"):
            self._finite(key, i, 0, T)
        return out

    def normalised(self, i: int, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, ...]:
        """Frames [start, stop) of trial i as the reference model sees them (default: all valid frames):
        video (T, height, width) float32 = video/255 resized with bilinear anti-aliasing; responses (T, N)
        float32 = responses * precision. Per-frame statistics apply to the same absolute frame: the reference
        multiplies the padded (N, T_pad) array before cutting."""
        T = self.valid_frames(i)
        stop = T if stop is None else stop
        if not 0 <= start < stop <= T:
            raise ValueError(f"{self.name} trial {i}: frames [{start}, {stop}) outside its {T} valid frames")
        video = torch.from_numpy(self._finite("videos", i, start, stop)).permute(2, 0, 1)[:, None] / 255
        video = F.interpolate(video, size=(self.height, self.width), mode="bilinear", antialias=True,
                              align_corners=False)[:, 0]
        precision = self.precision if self.precision.shape[1] == 1 else self.precision[:, start:stop]
        responses = self._finite("responses", i, start, stop) * precision
        responses = torch.from_numpy(np.ascontiguousarray(responses.T))
        return video.contiguous(), responses


def open_mice(paths: list[str], std_floor: float = 0.01, height: int = 32, width: int = 64) -> list[Mouse]:
    """Mouse objects for every mouse folder found under paths (see find_mice)."""
    return [Mouse(p, std_floor, height, width) for p in find_mice(paths)]


def mice_from_config(data_cfg, paths=None) -> list[Mouse]:
    """The mice of `paths` (default: data_cfg.paths) opened as a run's config.DataConfig says: response
    floor and video size. Every script opens its data here, so that what the model was trained on and
    what it is evaluated on cannot drift apart."""
    return open_mice(list(paths or data_cfg.paths), data_cfg.std_floor, data_cfg.height, data_cfg.width)


def check_run_data(train_mice: list[Mouse], heldout_mice: list[Mouse], frames: int) -> None:
    """What a training run reads, checked when it starts, before it writes anything (a fault found at step
    6 would leave half a run): every training animal has train-tier trials with responses (otherwise its
    untrained readout would be scored as a trained one), and every train and oracle trial of every animal
    reads with no NaN inside its valid window (all neurons, all pixels); train trials hold a window."""
    for m in train_mice:
        if not len(m.trials(["train"], hidden=False)):
            raise DataError(f"{m._file('meta/trials/tiers.npy')}: no train-tier trials with responses, so "
                            f"{m.name} cannot be trained on; hold it out (--holdout {m.name})")
    for m in train_mice + heldout_mice:
        for i in m.trials(["train", "oracle"], hidden=False):
            T = m.valid_frames(int(i))
            if T < frames and m in train_mice and m.tiers[i] == "train":
                raise DataError(f"{m._file(f'data/videos/{i}.npy')}: {T} valid frames, fewer than the "
                                f"{frames}-frame training window (--data.frames)")


# ---------------------------------------------------------------------------------------------
# Windows: random training windows (one mouse per batch, DDP shards), whole-trial evaluation windows
# ---------------------------------------------------------------------------------------------

def _train_trials(mouse: Mouse) -> np.ndarray:
    return mouse.trials(["train"], hidden=False)


def _mouse_key(mouse: Mouse) -> int:
    """Stable integer per mouse name: its random streams do not depend on which other mice are loaded."""
    return zlib.crc32(mouse.name.encode())


def train_batches_per_epoch(mice: list[Mouse], batch_size: int, rank: int = 0, world: int = 1) -> int:
    """Batches each rank gets per epoch: the same on every rank (DDP needs equal step counts).
    Per mouse, full batches of its train trials split evenly over the ranks; the remainder is dropped."""
    return sum(len(_train_trials(m)) // batch_size // world for m in mice)


def _train_plan(mice, frames, batch_size, seed, epoch, rank, world) -> list[tuple[int, tuple]]:
    """This rank's batches of one epoch: [(mouse index, ((trial, window start), ...)), ...].

    One window per train trial per epoch, as the reference. Each mouse's trials are shuffled and cut into
    full batches; rank r takes every world-th batch of each mouse, and all ranks cycle through the mice in
    step, so at a given step every rank trains the same mouse on different trials. Permutations and window
    starts come from generators seeded by (seed, epoch, mouse, trial): the plan is a pure function of its
    arguments, whoever computes it (no worker RNG), which makes resuming at a batch exact.
    """
    per_mouse = []
    for m, mouse in enumerate(mice):
        key = _mouse_key(mouse)
        trials = np.random.default_rng([seed, epoch, key]).permutation(_train_trials(mouse))
        batches = [trials[k:k + batch_size] for k in range(0, len(trials) - batch_size + 1, batch_size)]
        plan = []
        for batch in batches[rank::world][:len(batches) // world]:
            windows = []
            for i in map(int, batch):
                T = mouse.valid_frames(i)
                if T < frames:
                    raise DataError(f"{mouse._file(f'data/videos/{i}.npy')}: {T} valid frames, fewer than "
                                    f"the {frames}-frame training window")
                start = np.random.default_rng([seed, epoch, key, i]).integers(T - frames + 1)
                windows.append((i, int(start)))
            plan.append((m, tuple(windows)))
        per_mouse.append(plan)
    return [b for step in itertools.zip_longest(*per_mouse) for b in step if b is not None]


class TrainWindows(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches, addressed by the plan entries of _train_plan.

    Batch: video (B, 1, frames, H, W) float32, responses (B, frames, N) float32, index (B, frames) int64
    absolute frame numbers, trial (B,) int64, mouse str (one mouse per batch: neuron counts differ)."""

    def __init__(self, mice: list[Mouse], frames: int):
        self.mice, self.frames = mice, frames

    def __getitem__(self, item: tuple[int, tuple]) -> dict:
        m, windows = item
        mouse = self.mice[m]
        videos, responses = zip(*(mouse.normalised(i, s, s + self.frames) for i, s in windows), strict=True)
        starts = torch.tensor([s for _, s in windows], dtype=torch.int64)
        return {"video": torch.stack(videos)[:, None], "responses": torch.stack(responses),
                "index": starts[:, None] + torch.arange(self.frames), "mouse": mouse.name,
                "trial": torch.tensor([i for i, _ in windows], dtype=torch.int64)}


def make_train_loader(mice: list[Mouse], frames: int, batch_size: int, num_workers: int, seed: int,
                      epoch: int, rank: int = 0, world: int = 1,
                      start_batch: int = 0) -> torch.utils.data.DataLoader:
    """DataLoader over this rank's batches of `epoch` from batch `start_batch` on (see _train_plan);
    len(loader) is the number of batches left. Workers each build whole batches."""
    plan = _train_plan(mice, frames, batch_size, seed, epoch, rank, world)
    if not plan:
        raise DataError(f"no full batch of {batch_size} train trials per rank in "
                        f"{', '.join(m.path for m in mice) or 'no mice'}")
    # a private generator: otherwise each new iterator draws its worker seed from the global torch
    # RNG, and a resumed run (one more iterator) would sample different noise than a straight one
    return torch.utils.data.DataLoader(TrainWindows(mice, frames), batch_size=None,
                                       sampler=plan[start_batch:], num_workers=num_workers,
                                       generator=torch.Generator().manual_seed(seed + epoch))


def eval_windows(mouse: Mouse, i: int, frames: int) -> dict:
    """Trial i as consecutive non-overlapping `frames`-long windows from frame 0, plus, when the valid
    length T is not a multiple of `frames`, one last window aligned to the end (overlapping the one before).

    Returns video (W, 1, frames, H, W_px) float32, responses (W, frames, N) float32, index (W, frames) int64,
    keep (W, frames) bool: True where a frame appears for the first time, so each of the T valid frames is
    kept exactly once; trial, mouse, valid_frames (T) and covered (frames kept: T, or 0 when T < frames,
    in which case there are no windows)."""
    T = mouse.valid_frames(i)
    starts = list(range(0, T - frames + 1, frames))
    if starts and starts[-1] + frames < T:
        starts.append(T - frames)
    video, responses = mouse.normalised(i)
    index = torch.tensor(starts, dtype=torch.int64)[:, None] + torch.arange(frames)
    first_new = torch.tensor([0] + [s + frames for s in starts[:-1]], dtype=torch.int64)[:, None]
    keep = index >= first_new[:len(starts)]
    return {"video": video[index][:, None], "responses": responses[index], "index": index, "keep": keep,
            "trial": int(i), "mouse": mouse.name, "valid_frames": T, "covered": int(keep.sum())}


# ---------------------------------------------------------------------------------------------
# Stimulus identity from pixels: same video within a mouse (repeats) and across mice (pairs)
# ---------------------------------------------------------------------------------------------

THUMB_GRID = (6, 8)        # block-mean grid of a thumbnail frame (36 x 64 -> 6 x 8 blocks of 6 x 8 pixels)
THUMB_FRAMES = 8           # frames averaged per thumbnail time step
HASH_STEP = 4.0            # grey levels per hash bucket; two ±1-jittered copies differ by <= 2 < HASH_STEP,
                           # so probing the neighbouring buckets never misses a copy
SAME_CORR = 0.999          # Pearson r of two thumbnails above which the videos are the same
CACHE_VERSION = 2
KEY_BLOCKS, KEY_BLOCK_BYTES = 16, 4096   # strided sample of each video file in the cache key
_NEIGHBOURS = np.array(list(itertools.product((-1, 0, 1), repeat=4)))


def _thumbnail(video: np.ndarray) -> np.ndarray:
    """(H, W, T) valid frames -> (T // 8, 6, 8) block means: averaging over 384 pixels makes ±1 grey-level
    jitter vanish, while the thumbnail still tells natural videos apart."""
    H, W, T = video.shape
    (gh, gw), steps = THUMB_GRID, max(1, T // THUMB_FRAMES)
    per_step = T // steps
    v = video[: H // gh * gh, : W // gw * gw, : steps * per_step]
    return v.reshape(gh, H // gh, gw, W // gw, steps, per_step).mean((1, 3, 5)).transpose(2, 0, 1)


def _files_key(mouse: Mouse) -> str:
    """The cache's validity, keyed on content, not on sizes and times: a digest of tiers.npy and of a
    strided sample of every video file (its size and 16 blocks of 4 KiB at offsets k * size / 16, the first
    holding the header). A change to any run of bytes longer than 1/16 of a file meets a sampled block, and
    another video differs everywhere, so a video replaced by one of the same size and time is seen; a copy
    of the data keeps its cache. Cost: 64 KiB read per video (2% of a Sensorium video), not the video."""
    h = hashlib.sha1(f"v{CACHE_VERSION} {THUMB_GRID} {THUMB_FRAMES}".encode())
    with open(mouse._file("meta/trials/tiers.npy"), "rb") as f:
        h.update(f.read())
    for i in mouse.trials():
        with open(mouse._file(f"data/videos/{i}.npy"), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h.update(f"{i}:{size};".encode())
            for k in range(KEY_BLOCKS):
                f.seek(k * size // KEY_BLOCKS)
                h.update(f.read(KEY_BLOCK_BYTES))
    return h.hexdigest()


def _cache_paths(mouse: Mouse) -> list[str]:
    """In the mouse folder; for a read-only data folder, in the user's cache dir."""
    user = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pnba")
    tag = hashlib.sha1(os.path.abspath(mouse.path).encode()).hexdigest()[:12]
    return [os.path.join(mouse.path, ".pnba_stimulus_cache.npz"),
            os.path.join(user, f"{mouse.name}-{tag}.npz")]


def _video_thumbnails(mouse: Mouse) -> dict[str, np.ndarray]:
    """Every trial with files: trials (n,), valid video frames (n,), steps (n,) and thumbs (sum(steps), 6, 8)
    float16 (the trials' thumbnails one after the other). Cached on disk, keyed on the video files."""
    key = _files_key(mouse)
    for path in _cache_paths(mouse):
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["key"]) == key:
                    return {k: f[k] for k in f.files}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            continue
    frames, thumbs = [], []
    for i in tqdm(mouse.trials(), desc=f"hashing videos of {mouse.name}", leave=False, disable=None):
        path = mouse._file(f"data/videos/{i}.npy")
        video = np.array(mouse._array("videos", i), dtype=np.float32)
        T = _valid_length(video, path, ("row", "column"))                # the video alone defines identity
        if T == 0:
            raise DataError(f"{path}: no valid frames (NaN from frame 0)")
        frames.append(T)
        thumbs.append(_thumbnail(video[..., :T]))
    arrays = {"key": np.array(key), "trials": mouse.trials(), "frames": np.array(frames, dtype=np.int64),
              "steps": np.array([len(t) for t in thumbs], dtype=np.int64),
              "thumbs": np.concatenate(thumbs).astype(np.float16)}
    for path in _cache_paths(mouse):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _save_npz(path, arrays)
            break
        except OSError:
            continue
    return arrays


def stimulus_groups(mice: list[Mouse]) -> dict[tuple[str, int], int]:
    """(mouse name, trial) -> stimulus id, for every trial with files; equal ids = the same video, within a
    mouse and across mice. Ids are numbered in order of (mouse name, trial), so they depend only on the set of
    mice. Only videos of equal valid length are compared: each is hashed to a bucket by the mean grey level
    of the four quadrants of its first thumbnail step, candidates come from the same and neighbouring
    buckets, and a candidate is the same video when the thumbnails correlate above 0.999 (flat videos:
    when they differ by at most 2 grey levels everywhere)."""
    entries, frames, thumbs = [], [], []
    for mouse in sorted(mice, key=lambda m: m.name):
        v = _video_thumbnails(mouse)
        entries += [(mouse.name, int(i)) for i in v["trials"]]
        frames += v["frames"].tolist()
        thumbs += np.split(v["thumbs"].astype(np.float32), np.cumsum(v["steps"])[:-1])
    parent = list(range(len(entries)))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    by_length = defaultdict(list)
    for k, T in enumerate(frames):
        by_length[T].append(k)
    for members in by_length.values():
        flat = np.stack([thumbs[k].ravel() for k in members])                 # (n, D)
        centred = flat - flat.mean(1, keepdims=True)
        norm = np.linalg.norm(centred, axis=1)
        unit = centred / np.maximum(norm, 1e-9)[:, None]                      # Pearson r = unit @ unit
        spread = norm / np.sqrt(flat.shape[1])                                # thumbnail std, grey levels
        first = np.stack([thumbs[k][0] for k in members])                     # (n, 6, 8)
        n, gh, gw = first.shape
        quadrants = first.reshape(n, 2, gh // 2, 2, gw // 2).mean((2, 4)).reshape(n, 4)
        codes = np.floor(quadrants / HASH_STEP).astype(np.int64)
        buckets = defaultdict(list)
        for a, code in enumerate(map(tuple, codes)):
            buckets[code].append(a)
        for a in range(n):
            cands = [b for off in _NEIGHBOURS for b in buckets.get(tuple(codes[a] + off), ()) if b > a]
            cands = np.array(cands, dtype=np.int64)
            if len(cands) == 0:
                continue
            flat_pair = (spread[a] < 0.5) & (spread[cands] < 0.5)
            same = np.where(flat_pair, np.abs(flat[cands] - flat[a]).max(1) <= 2,
                            unit[cands] @ unit[a] > SAME_CORR)
            for b in cands[same]:
                parent[root(members[b])] = root(members[a])
    ids: dict[int, int] = {}
    return {e: ids.setdefault(root(k), len(ids)) for k, e in enumerate(entries)}


def pairs(groups: dict[tuple[str, int], int], a, b) -> list[tuple[int, int]]:
    """(trial of a, trial of b) for every two trials showing the same video; a, b: mouse names or Mice."""
    a, b = getattr(a, "name", a), getattr(b, "name", b)
    of_b = defaultdict(list)
    for (name, j), s in groups.items():
        if name == b:
            of_b[s].append(j)
    return sorted((i, j) for (name, i), s in groups.items() if name == a for j in of_b.get(s, ()))


def repeats(groups: dict[tuple[str, int], int], mouse) -> list[list[int]]:
    """Groups of >= 2 trials of one mouse (name or Mouse) that show the same video, sorted."""
    name = getattr(mouse, "name", mouse)
    by_id = defaultdict(list)
    for (n, i), s in groups.items():
        if n == name:
            by_id[s].append(i)
    return sorted(sorted(g) for g in by_id.values() if len(g) > 1)


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Uncompressed .npz with fixed zip timestamps (np.savez stamps the current time: same data, other
    bytes), written through config.atomic_path so readers never see half a file."""
    with config.atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as z:
        for name, a in arrays.items():
            with z.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w",
                        force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(a), allow_pickle=False)


# ---------------------------------------------------------------------------------------------
# Synthetic dataset in the Sensorium format, from a known shared stimulus latent (data_formats.md §5)
# ---------------------------------------------------------------------------------------------

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
TRUTH_DIR = "_synthetic_truth"
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


def synthetic_spec(cls, presets: dict, preset: str, overrides: dict):
    """cls(**presets[preset] with overrides); ValueError naming the valid presets or fields."""
    if preset not in presets:
        raise ValueError(f"unknown synthetic preset {preset!r}; valid: {', '.join(presets)}")
    try:
        return cls(**{**presets[preset], **overrides})
    except TypeError:
        valid = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ValueError(f"unknown synthetic override in {sorted(overrides)}; valid: {valid}") from None


def write_new_folder(root: str, write) -> list[str]:
    """Fill a new (or empty) folder `root` through write(temp folder) -> names written, in a temp folder
    beside it renamed at the end: never half a dataset. Returns root/name for each name."""
    root = os.path.normpath(root)
    if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise DataError(f"{root}: already exists and is not an empty folder")
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synth-", dir=parent)
    try:
        names = write(tmp)
        os.chmod(tmp, 0o755)
        if os.path.isdir(root):
            os.rmdir(root)
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [os.path.join(root, n) for n in names]


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
    _save_npz(os.path.join(out, TRUTH_DIR, "truth.npz"), truth)
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


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def describe(mice: list[Mouse], groups: dict[tuple[str, int], int]) -> dict:
    """What `check --json` prints: per mouse neurons, slots per tier (with "none"), valid-frame lengths
    {length: trials}, hidden tiers; same-video trial pairs between mice and repeat groups within each."""
    mice = sorted(mice, key=lambda m: m.name)
    out = {"mice": {}, "pairs": [], "repeats": {}}
    for m in mice:
        tiers, counts = np.unique(m.tiers, return_counts=True)
        lengths = defaultdict(int)
        for i in m.trials():
            lengths[m.valid_frames(i)] += 1
        out["mice"][m.name] = {"neurons": m.n_neurons,
                               "tiers": dict(zip(tiers.tolist(), counts.tolist(), strict=True)),
                               "valid_frames": {str(t): n for t, n in sorted(lengths.items())},
                               "hidden_tiers": m.hidden_tiers}
        out["repeats"][m.name] = repeats(groups, m)
    for a, b in itertools.combinations(mice, 2):
        trials = pairs(groups, a, b)
        if trials:
            out["pairs"].append({"a": a.name, "b": b.name, "trials": [list(p) for p in trials]})
    return out


def _tier_family(tier: str) -> str:
    """live_test_main, final_test_main -> test_main: the split is the competition's, not the stimulus's."""
    return tier.removeprefix("live_").removeprefix("final_")


def _print_report(mice: list[Mouse], report: dict) -> None:
    tiers_of = {m.name: m.tiers for m in mice}
    for name, info in report["mice"].items():
        print(f"{name}: {info['neurons']} neurons, hidden tiers: {', '.join(info['hidden_tiers']) or '-'}")
        print("  slots per tier: " + ", ".join(f"{t} {n}" for t, n in info["tiers"].items()))
        print("  valid frames:   " + ", ".join(f"{t} x{n}" for t, n in info["valid_frames"].items()))
        for group in report["repeats"][name]:
            tiers = "/".join(sorted(set(tiers_of[name][group].tolist())))
            print(f"  same video x{len(group)} ({tiers}): {' '.join(map(str, group))}")
    for p in report["pairs"]:
        kinds = defaultdict(int)
        for i, j in p["trials"]:
            kinds["-".join(_tier_family(tiers_of[m][t]) for m, t in ((p["a"], i), (p["b"], j)))] += 1
        detail = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        print(f"same video in {p['a']} and {p['b']}: {len(p['trials'])} trial pairs ({detail})")
    if not report["pairs"] and len(mice) > 1:
        print("no video is shared between these mice")


def main(argv: list[str] | None = None) -> int:
    import nwb  # here, not at the top: nwb imports this module (DataError)

    p = argparse.ArgumentParser(prog="data.py", description="Sensorium 2023 and NWB monkey data: synthetic "
                                "writer, checker.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="write a synthetic dataset: Sensorium format (monkey: NWB)")
    s.add_argument("out", help="new (or empty) folder to write")
    s.add_argument("--preset", default="demo", choices=[*SYNTH_PRESETS, *nwb.NWB_SYNTH_PRESETS])
    s.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("check", help="describe mouse folders and the videos they share, or NWB files")
    c.add_argument("dirs", nargs="+", help="mouse folders or folders holding them, or .nwb files / folders")
    c.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = p.parse_args(argv)
    try:
        if args.command == "synth":
            writer = nwb.write_synthetic_nwb if args.preset in nwb.NWB_SYNTH_PRESETS else write_synthetic
            for path in writer(args.out, args.preset, args.seed):
                print(path)
            print(os.path.join(args.out, TRUTH_DIR))
        elif nwb.is_nwb_input(args.dirs):
            report = nwb.describe([nwb.open_session(f) for f in nwb.find_nwb(args.dirs)])
            if args.json:
                print(json.dumps(report))
            else:
                nwb.print_report(report)
        else:
            mice = open_mice(args.dirs)
            report = describe(mice, stimulus_groups(mice))
            if args.json:
                print(json.dumps(report))
            else:
                _print_report(mice, report)
    except (DataError, nwb.DataError) as e:  # differ when run as a script: nwb imports `data`, not __main__
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
