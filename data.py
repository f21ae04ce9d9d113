"""Sensorium 2023 data: reader, normaliser, windows, pairing by video hash, synthetic writer.

Also the one definition of the representations file (write_representations / read_representations)
that extract.py writes and the stats scripts read.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field

import h5py
import numpy as np


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
    """Write trials to HDF5 at `path` atomically (temp file in the same folder, then rename).

    attrs: file attributes (e.g. checkpoint digest, config as a JSON string); non-str values are
    stored as JSON strings.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".reps-", suffix=".h5.tmp", dir=folder)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
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
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_representations(path: str) -> tuple[list[TrialRep], dict]:
    """Read a file written by write_representations; DataError if it is missing or not ours."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such representations file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
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
