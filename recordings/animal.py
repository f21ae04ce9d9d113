"""The recording interface: what code outside recordings/ may call on an animal, and nothing else.

Two recordings implement it: recordings.sensorium.Mouse (a Sensorium 2023 folder, the stimulus a video) and
recordings.nwb.Monkey (one NWB session, the stimulus the hand velocity); the synthetic datasets are written
in those formats and read by the same classes. A trial is addressed by its index i into `tiers`.

    animal: Animal = data.mice_from_config(cfg.data)[0]
    stimulus, responses = animal.normalised(i)      # video (T, H, W) or velocity (T, D); responses (T, N)
    if isinstance(animal, BehaviourAnimal):          # NWB sessions: kinematics, conditions, spike counts
        counts = animal.spike_counts(i)              # (T, N), NaN where a unit was not recorded

Both protocols are runtime-checkable: isinstance() checks that every member below exists (not its types).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class Animal(Protocol):
    """One recording of one animal: its neurons have their own readout, its trials their tiers."""

    name: str                     # the animal key (a mouse folder's name; "<subject>-<session>" for NWB)
    path: str                     # where it was read from, for messages
    subject: str                  # the individual (a mouse: its name)
    session: str                  # the recording session (a mouse: its name)
    stimulus_kind: str            # "video" | "behaviour": what normalised() returns first
    tiers: np.ndarray             # (trials,) str: "train", "oracle", ... per trial index
    n_neurons: int                # N
    mean_rate: np.ndarray | None  # (N,) mean normalised response over the train tier, None if unknown
    coords: np.ndarray | None     # (N, 3) cortical coordinates, None if the data has none
    hidden_tiers: list[str]       # tiers whose responses are withheld (competition test sets)
    state_dim: int                # channels of the recorded behavioural state (0: none)

    @property
    def tiers_source(self) -> str:
        """Where the tiers come from, for messages."""

    def trials(self, tiers=None, hidden: bool = True) -> np.ndarray:
        """Trial indices, of `tiers` (a name or a list) if given; hidden=False leaves out trials whose
        responses are withheld."""

    def valid_frames(self, i: int) -> int:
        """T: trial i's frames before its padding."""

    def is_hidden(self, i: int) -> bool:
        """Trial i's responses are withheld."""

    def normalised(self, i: int, start: int = 0,
                   stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames [start, stop) of trial i as the model reads them: the stimulus (video (T, H, W) or
        behaviour (T, D)) and the responses (T, N), float32."""

    def observed(self, i: int, start: int = 0, stop: int | None = None) -> torch.Tensor | None:
        """(T, N) bool: the neuron was recorded over the frame; None when every neuron always is."""

    def state(self, i: int, start: int = 0, stop: int | None = None) -> torch.Tensor | None:
        """(T, state_dim) float32 recorded behavioural state of trial i, z-scored; None without one."""

    def source(self, i: int) -> str:
        """Where trial i comes from, for messages."""

    def coords_tensor(self, device=None) -> torch.Tensor | None:
        """coords as a float32 tensor on `device`, or None."""


@runtime_checkable
class BehaviourAnimal(Animal, Protocol):
    """An animal whose stimulus is its own behaviour (NWB reaching): trials carry a condition label, the
    kinematics in one scale-free space and the raw spike counts."""

    behaviour_space: str          # the space normalised_behaviour() is in (nwb.BEHAVIOUR_SPACE)
    behaviour_scale: float        # normalised_behaviour(i) x this = the file's values
    behaviour_unit: str           # the unit the file states (may be wrong: nothing relies on it)

    def condition(self, i: int) -> str:
        """Trial i's condition label (the pairing key across sessions)."""

    def normalised_behaviour(self, i: int) -> np.ndarray:
        """(T, D) float32: trial i's behaviour in behaviour_space (what the model reads)."""

    def spike_counts(self, i: int) -> np.ndarray:
        """(T, N) float32: trial i's spike counts per bin of the animal's N units, NaN where a unit was not
        recorded over the bin (normalised() fills those in; a decoder of counts imputes its own)."""
