"""The representations file, defined once: extract.py writes it, the stats scripts read it.

/<animal>/<tier>/<trial>/{mu_x, logvar_x, mu_y, logvar_y, mu_p[, behaviour]} float32 (frames, ...), with
attributes stimulus, valid_frames, condition per trial and heldout, subject, session per animal.
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


REPS_VERSION = 2


REPS_ARRAYS = ("mu_x", "logvar_x", "mu_y", "logvar_y", "mu_p")
# what the trial's stimulus modality was, per frame, when it is low-dimensional: the behaviour (frames, D),
# e.g. hand velocity in the file's units, for decoding and the condition ceiling


REPS_DATA_ARRAYS = ("behaviour",)


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
            g = mouse.require_group(t.tier).create_group(str(t.trial))
            g.attrs["stimulus"] = int(t.stimulus)
            g.attrs["valid_frames"] = int(t.valid_frames)
            g.attrs["condition"] = t.condition
            for name in REPS_ARRAYS + REPS_DATA_ARRAYS:
                if t.arrays.get(name) is not None:
                    g.create_dataset(name, data=np.asarray(t.arrays[name], dtype=np.float32))


def read_representations(path: str) -> tuple[list[TrialRep], dict]:
    """Read a file written by write_representations; DataError if it is missing or not ours."""
    with open_hdf5(path, "representations file") as f:
        if f.attrs.get("format") != REPS_FORMAT:
            raise DataError(f"{path}: not a PNBA representations file (no format={REPS_FORMAT!r} attribute)")
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        trials = []
        for mouse, mg in f.items():
            heldout = bool(mg.attrs.get("heldout", False))
            subject, session = (str(mg.attrs.get(k, mouse)) for k in ("subject", "session"))
            for tier, tg in mg.items():
                for trial, g in tg.items():
                    arrays = {n: g[n][()] for n in REPS_ARRAYS + REPS_DATA_ARRAYS if n in g}
                    trials.append(TrialRep(mouse, tier, int(trial), int(g.attrs["stimulus"]),
                                           int(g.attrs["valid_frames"]), heldout, arrays, subject, session,
                                           str(g.attrs.get("condition", ""))))
    trials.sort(key=lambda t: (t.mouse, t.tier, t.trial))
    return trials, attrs
