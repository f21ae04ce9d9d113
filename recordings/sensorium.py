"""Sensorium 2023 reader: one mouse folder, memory-mapped per trial, normalised as the reference pipeline
(docs/data_formats.md §1-2).

    mice = open_mice(["/data/sensorium"])                 # mouse folders or their parent
    video, responses = mice[0].normalised(i)               # (T, 32, 64), (T, N) float32
"""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from recordings.common import DataError

DATA_KEYS = ("videos", "responses", "behavior", "pupil_center")
# the recorded behavioural state: behavior (pupil dilation, running speed), pupil_center (eye x, y)
STATE_KEYS = ("behavior", "pupil_center")
STATE_CHANNELS = 4


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


def valid_length(a: np.ndarray, path: str, axes: tuple[str, ...]) -> int:
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
        self.subject = self.session = self.name    # one recording of one mouse (NWB: one of several sessions)
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

        self._state_mean, self._state_std = self._state_statistics()
        self.state_dim = STATE_CHANNELS if self._state_mean is not None else 0

        for key in ("videos", "responses"):
            folder = self._file(f"data/{key}")
            if not os.path.isdir(folder):
                raise DataError(f"{folder}: missing")
            have = {f[:-4] for f in os.listdir(folder) if f.endswith(".npy")}
            missing = [i for i in self._trials if str(i) not in have]
            if missing:
                raise DataError(f"{folder}/{missing[0]}.npy: missing, but tiers.npy says "
                                f"{str(self.tiers[missing[0]])!r} ({len(missing)} missing in all)")
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

    stimulus_kind = "video"

    def _state_statistics(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Mean and std (4,) of the state channels from meta/statistics/<key>/all (per-frame statistics are
        averaged over frames); (None, None) when a folder lacks the behaviour data or its statistics."""
        means, stds = [], []
        for key in STATE_KEYS:
            folder = self._file(f"meta/statistics/{key}/all")
            if not os.path.isdir(self._file(f"data/{key}")) or not os.path.isdir(folder):
                return None, None
            for name, out in (("mean", means), ("std", stds)):
                path = os.path.join(folder, f"{name}.npy")
                a = np.asarray(_load(path, mmap=False), dtype=np.float64)
                if a.ndim not in (1, 2) or len(a) != 2:
                    raise DataError(f"{path}: shape {a.shape}, expected (2,) or (2, frames)")
                out.append(np.nanmean(a.reshape(2, -1), axis=1))
        mean, std = np.concatenate(means), np.concatenate(stds)
        if not np.all(np.isfinite(mean)) or not np.all(np.isfinite(std)):
            raise DataError(f"{self._file('meta/statistics')}: behavior/pupil_center statistics not finite")
        # a channel that never varies (std 0) is centred, not blown up
        return mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)

    def state(self, i: int, start: int = 0, stop: int | None = None) -> torch.Tensor | None:
        """Frames [start, stop) of trial i's recorded behavioural state (T, 4) float32: pupil dilation,
        running speed, eye x, eye y, each z-scored with the folder's statistics; None when the folder has
        no behaviour data. A NaN inside the valid frames is a DataError naming the file."""
        if not self.state_dim:
            return None
        T = self.valid_frames(i)
        stop = T if stop is None else stop
        channels = []
        for key in STATE_KEYS:
            if self._array(key, i).shape[0] != 2:
                raise DataError(f"{self._file(f'data/{key}/{int(i)}.npy')}: shape "
                                f"{self._array(key, i).shape}, expected (2, frames)")
            channels.append(self._finite(key, i, start, stop))
        state = (np.concatenate(channels).T - self._state_mean) / self._state_std
        return torch.from_numpy(np.ascontiguousarray(state, dtype=np.float32))

    @property
    def tiers_source(self) -> str:
        """Where the tiers come from, for messages."""
        return self._file("meta/trials/tiers.npy")

    def source(self, i: int) -> str:
        """Where trial i comes from, for messages."""
        return self._file(f"data/videos/{int(i)}.npy")

    def observed(self, i: int, start: int = 0, stop: int | None = None) -> None:
        """Every neuron is recorded in every valid frame (a NaN there is a DataError)."""
        return None

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
            lengths = [valid_length(self._array(key, i), self._file(f"data/{key}/{i}.npy"), axes)
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
