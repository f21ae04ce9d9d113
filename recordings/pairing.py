"""Stimulus identity from pixels: the same video within a mouse (repeats) and across mice (pairs), from
hashed thumbnails of the valid frames (docs/data_formats.md §3), cached per mouse folder by content."""

from __future__ import annotations

import hashlib
import itertools
import os
import zipfile
from collections import defaultdict

import numpy as np
from tqdm import tqdm

from recordings.animal import Animal, BehaviourAnimal
from recordings.common import DataError, save_npz
from recordings.sensorium import Mouse, valid_length

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
        T = valid_length(video, path, ("row", "column"))                # the video alone defines identity
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
            save_npz(path, arrays)
            break
        except OSError:
            continue
    return arrays


def stimulus_groups(mice: list[Animal]) -> dict[tuple[str, int], int]:
    """(animal name, trial) -> stimulus id, for every trial with files; equal ids = the same stimulus, within
    an animal and across animals. Behaviour recordings (recordings.nwb.Monkey): the same condition label
    (condition_groups). Videos: the same video. Ids are numbered in order of (mouse name, trial), so they
    depend only on the set of mice. Only videos of equal valid length are compared: each is hashed to a
    bucket by the mean grey level of the four quadrants of its first thumbnail step, candidates come from
    the same and neighbouring buckets, and a candidate is the same video when the thumbnails correlate above
    0.999 (flat videos: when they differ by at most 2 grey levels everywhere)."""
    if any(m.stimulus_kind == "behaviour" for m in mice):
        return condition_groups(mice)
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


def condition_groups(animals: list[BehaviourAnimal]) -> dict[tuple[str, int], int]:
    """(animal name, trial) -> condition id: conditions numbered in sorted label order over all animals, so
    that the same label is the same id in every session and monkey (different task layouts use different
    labels and never pair). DataError if the animals mix videos and behaviour."""
    kinds = {a.stimulus_kind for a in animals}
    if len(kinds) > 1:
        raise DataError(f"{', '.join(a.path for a in animals)}: a run reads one kind of recording, not "
                        f"{' and '.join(sorted(kinds))} together")
    labels = sorted({a.condition(i) for a in animals for i in a.trials()})
    ids = {c: k for k, c in enumerate(labels)}
    return {(a.name, int(i)): ids[a.condition(i)] for a in sorted(animals, key=lambda a: a.name)
            for i in a.trials()}


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
