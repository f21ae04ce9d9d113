"""The representations file, defined once: extract.py writes it, the stats scripts read it.

/<animal>/<tier>/<trial>/{mu_x, logvar_x, mu_y, logvar_y, mu_p[, behaviour]} float32 (frames, ...), with
attributes stimulus, valid_frames, condition per trial and heldout, subject, session per animal.

Behaviour (version 3). `behaviour` (frames, D) is the trial's behaviour in the space the model saw it in,
named per animal by the attribute `behaviour_space` (NWB monkeys: recordings.nwb.BEHAVIOUR_SPACE, the
velocity divided by the session's RMS speed over its train tier), so that every animal's behaviour is in
one unit whatever its file stored. Per animal also `behaviour_scale` (multiply `behaviour` by it to get
the velocity back in the file's values, after its conversion) and `behaviour_unit` (the unit attribute
the file states, which may be wrong: nothing here relies on it). Versions 1 and 2 stored `behaviour` in
each file's own units with none of these; they read with behaviour_space "file units of <animal>",
a space of its own per animal, so that no decoder is fitted across animals whose units may differ.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import h5py
import numpy as np

import config
from recordings.common import DataError, open_hdf5

REPS_FORMAT = "pnba-representations"


REPS_VERSION = 3                    # 3: behaviour in one named space per animal (see above)


REPS_ARRAYS = ("mu_x", "logvar_x", "mu_y", "logvar_y", "mu_p")
# optional per trial: what the trial's stimulus modality was, per frame, when it is low-dimensional: the
# behaviour (frames, D), e.g. hand velocity / the session's RMS speed (behaviour_space), for decoding and the
# condition ceiling; and mu_x_free (frames, latent): a training animal's mu_x from the identity-free path
# (no unit embeddings), what a new animal gets, written for models with unit embeddings: zero-shot decoders
# are fitted on it, so that they meet held-out animals' latents from the path they were fitted on
REPS_DATA_ARRAYS = ("behaviour", "mu_x_free")


@dataclass
class TrialRep:
    """Representations of one trial: arrays are float32 (frames, latent), mu_y/logvar_y may be absent; plus
    "behaviour" (frames, D) for behaviour recordings. `mouse` is the animal key: a Sensorium mouse, or one
    NWB session (its units are its own); subject and session name what it belongs to."""

    mouse: str
    tier: str
    trial: int
    stimulus: int                 # global stimulus group id: pixel pairing or condition (-1: unknown)
    valid_frames: int
    heldout: bool
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    subject: str = ""             # the individual ("" : the animal key itself)
    session: str = ""             # the recording session ("" : the animal key itself)
    condition: str = ""           # the condition label as the data name it ("" : none)
    behaviour_space: str = ""     # the space "behaviour" is in (per animal; "" : no behaviour, or unnamed)
    behaviour_scale: float | None = None    # behaviour x this = the file's values (None: unknown)
    behaviour_unit: str = ""      # the unit the file states for them (may be wrong)


def legacy_behaviour_space(animal: str) -> str:
    """The behaviour space of an animal in a version 1 or 2 file: its file's own units, its own space."""
    return f"file units of {animal}"


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
            mouse.attrs["subject"] = t.subject or t.mouse
            mouse.attrs["session"] = t.session or t.mouse
            if t.behaviour_space:
                mouse.attrs["behaviour_space"] = t.behaviour_space
                mouse.attrs["behaviour_unit"] = t.behaviour_unit
                if t.behaviour_scale is not None:
                    mouse.attrs["behaviour_scale"] = float(t.behaviour_scale)
            g = mouse.require_group(t.tier).create_group(str(t.trial))
            g.attrs["stimulus"] = int(t.stimulus)
            g.attrs["valid_frames"] = int(t.valid_frames)
            g.attrs["condition"] = t.condition
            for name in REPS_ARRAYS + REPS_DATA_ARRAYS:
                if t.arrays.get(name) is not None:
                    g.create_dataset(name, data=np.asarray(t.arrays[name], dtype=np.float32))


def _attributes(f: h5py.File, path: str) -> dict:
    """The file attributes of an open representations file, bytes decoded; DataError if it is not ours."""
    if f.attrs.get("format") != REPS_FORMAT:
        raise DataError(f"{path}: not a PNBA representations file (no format={REPS_FORMAT!r} attribute)")
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def read_attributes(path: str) -> dict:
    """The file attributes of a representations file (e.g. "config", the run's config as a JSON string)
    without its trials; DataError if it is missing or not ours."""
    with open_hdf5(path, "representations file") as f:
        return _attributes(f, path)


def read_representations(path: str) -> tuple[list[TrialRep], dict]:
    """Read a file written by write_representations; DataError if it is missing or not ours."""
    with open_hdf5(path, "representations file") as f:
        attrs = _attributes(f, path)
        version = int(attrs.get("version", 1))
        trials = []
        for mouse, mg in f.items():
            heldout = bool(mg.attrs.get("heldout", False))
            subject, session = (str(mg.attrs.get(k, mouse)) for k in ("subject", "session"))
            space, unit = (str(mg.attrs.get(k, "")) for k in ("behaviour_space", "behaviour_unit"))
            scale = float(mg.attrs["behaviour_scale"]) if "behaviour_scale" in mg.attrs else None
            for tier, tg in mg.items():
                for trial, g in tg.items():
                    arrays = {n: g[n][()] for n in REPS_ARRAYS + REPS_DATA_ARRAYS if n in g}
                    if version < 3 and "behaviour" in arrays:
                        space = legacy_behaviour_space(mouse)
                    trials.append(TrialRep(mouse, tier, int(trial), int(g.attrs["stimulus"]),
                                           int(g.attrs["valid_frames"]), heldout, arrays, subject, session,
                                           str(g.attrs.get("condition", "")), space, scale, unit))
    trials.sort(key=lambda t: (t.mouse, t.tier, t.trial))
    return trials, attrs
