"""What a run reads from any recording: the run-start check, random training windows (one animal per
batch, DDP shards, a plan that is a pure function of its arguments) and whole-trial evaluation windows.

A recording here is anything with the recording interface recordings.animal.Animal
(recordings.sensorium.Mouse, recordings.nwb.Monkey).
"""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import torch

from recordings.animal import Animal
from recordings.common import DataError


def check_state(animals: list[Animal], state_input: str) -> None:
    """DataError unless every animal has the recorded behavioural state the model reads (config
    model.state_input; Animal.state_dim > 0)."""
    if state_input == "none":
        return
    for m in animals:
        if not m.state_dim:
            raise DataError(f"{m.path}: no recorded behavioural state (data/behavior, data/pupil_center and "
                            f"their meta/statistics), but the model reads one (model.state_input "
                            f"{state_input}); train with --model.state_input none")


def check_run_data(train_mice: list[Animal], heldout_mice: list[Animal], frames: int,
                   state_input: str = "none") -> None:
    """What a training run reads, checked when it starts, before it writes anything (a fault found at step
    6 would leave half a run): every training animal has train-tier trials with responses (otherwise its
    untrained readout would be scored as a trained one), and every train and oracle trial of every animal
    reads with no NaN inside its valid window (all neurons, all pixels, and the behavioural state if the
    model reads it); train trials hold a window."""
    check_state(train_mice + heldout_mice, state_input)
    for m in train_mice:
        if not len(m.trials(["train"], hidden=False)):
            raise DataError(f"{m.tiers_source}: no train-tier trials with responses, so "
                            f"{m.name} cannot be trained on; hold it out (--holdout {m.name})")
    for m in train_mice + heldout_mice:
        for i in m.trials(["train", "oracle"], hidden=False):
            T = m.valid_frames(int(i))
            if T < frames and m in train_mice and m.tiers[i] == "train":
                raise DataError(f"{m.source(i)}: {T} valid frames, fewer than the "
                                f"{frames}-frame training window (--data.frames)")
            if state_input != "none":
                m.state(int(i))


def _train_trials(mouse: Animal) -> np.ndarray:
    return mouse.trials(["train"], hidden=False)


def _mouse_key(mouse: Animal) -> int:
    """Stable integer per mouse name: its random streams do not depend on which other mice are loaded."""
    return zlib.crc32(mouse.name.encode())


def train_batches_per_epoch(mice: list[Animal], batch_size: int, rank: int = 0, world: int = 1) -> int:
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
                    raise DataError(f"{mouse.source(i)}: {T} valid frames, fewer than "
                                    f"the {frames}-frame training window")
                start = np.random.default_rng([seed, epoch, key, i]).integers(T - frames + 1)
                windows.append((i, int(start)))
            plan.append((m, tuple(windows)))
        per_mouse.append(plan)
    return [b for step in itertools.zip_longest(*per_mouse) for b in step if b is not None]


class TrainWindows(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches, addressed by the plan entries of _train_plan.

    Batch: stimulus = video (B, 1, frames, H, W) or behaviour (B, frames, D) float32, responses (B, frames, N)
    float32, index (B, frames) int64 absolute frame numbers, trial (B,) int64, mouse str (one animal per
    batch: neuron counts differ), observed (B, frames, N) bool when some units were not recorded
    throughout (NWB), and state (B, frames, state_dim) float32 with `state` (the model reads the recorded
    behavioural state, Animal.state; read only then, so that a model that ignores it never trips on it)."""

    def __init__(self, mice: list[Animal], frames: int, state: bool = False):
        self.mice, self.frames, self.state = mice, frames, state

    def __getitem__(self, item: tuple[int, tuple]) -> dict:
        m, windows = item
        mouse = self.mice[m]
        stimuli, responses = zip(*(mouse.normalised(i, s, s + self.frames) for i, s in windows), strict=True)
        starts = torch.tensor([s for _, s in windows], dtype=torch.int64)
        batch = {"stimulus": _stimulus_batch(mouse, torch.stack(stimuli)),
                 "responses": torch.stack(responses), "index": starts[:, None] + torch.arange(self.frames),
                 "mouse": mouse.name,
                 "trial": torch.tensor([i for i, _ in windows], dtype=torch.int64)}
        observed = [mouse.observed(i, s, s + self.frames) for i, s in windows]
        if observed[0] is not None and not all(o.all() for o in observed):
            batch["observed"] = torch.stack(observed)
        if self.state:
            batch["state"] = torch.stack([mouse.state(i, s, s + self.frames) for i, s in windows])
        return batch


def _stimulus_batch(mouse, stimuli: torch.Tensor) -> torch.Tensor:
    """Stacked normalised stimuli as the model takes them: videos (B, T, H, W) -> (B, 1, T, H, W) (one
    channel); behaviour (B, T, D) as it is."""
    return stimuli[:, None] if mouse.stimulus_kind == "video" else stimuli


def make_train_loader(mice: list[Animal], frames: int, batch_size: int, num_workers: int, seed: int,
                      epoch: int, rank: int = 0, world: int = 1, start_batch: int = 0,
                      state: bool = False) -> torch.utils.data.DataLoader:
    """DataLoader over this rank's batches of `epoch` from batch `start_batch` on (see _train_plan);
    len(loader) is the number of batches left. Workers each build whole batches."""
    plan = _train_plan(mice, frames, batch_size, seed, epoch, rank, world)
    if not plan:
        raise DataError(f"no full batch of {batch_size} train trials per rank in "
                        f"{', '.join(m.path for m in mice) or 'no mice'}")
    # a private generator: otherwise each new iterator draws its worker seed from the global torch
    # RNG, and a resumed run (one more iterator) would sample different noise than a straight one
    return torch.utils.data.DataLoader(TrainWindows(mice, frames, state), batch_size=None,
                                       sampler=plan[start_batch:], num_workers=num_workers,
                                       generator=torch.Generator().manual_seed(seed + epoch))


def eval_windows(mouse: Animal, i: int, frames: int, state: bool = False) -> dict:
    """Trial i as consecutive non-overlapping `frames`-long windows from frame 0, plus, when the valid
    length T is not a multiple of `frames`, one last window aligned to the end (overlapping the one before).

    Returns stimulus (W, 1, frames, H, W_px) video or (W, frames, D) behaviour float32, responses
    (W, frames, N) float32, observed (W, frames, N) bool or None (see TrainWindows), state
    (W, frames, state_dim) float32 with `state`, else None (the recorded behavioural state), index (W, frames)
    int64,
    keep (W, frames) bool: True where a frame appears for the first time, so each of the T valid frames is
    kept exactly once; trial, mouse, valid_frames (T) and covered (frames kept: T, or 0 when T < frames,
    in which case there are no windows)."""
    T = mouse.valid_frames(i)
    starts = list(range(0, T - frames + 1, frames))
    if starts and starts[-1] + frames < T:
        starts.append(T - frames)
    stimulus, responses = mouse.normalised(i)
    observed = mouse.observed(i)
    state = mouse.state(i) if state else None
    index = torch.tensor(starts, dtype=torch.int64)[:, None] + torch.arange(frames)
    first_new = torch.tensor([0] + [s + frames for s in starts[:-1]], dtype=torch.int64)[:, None]
    keep = index >= first_new[:len(starts)]
    return {"stimulus": _stimulus_batch(mouse, stimulus[index]), "responses": responses[index],
            "observed": None if observed is None or observed.all() else observed[index],
            "state": None if state is None else state[index], "index": index,
            "keep": keep, "trial": int(i), "mouse": mouse.name, "valid_frames": T, "covered": int(keep.sum())}
