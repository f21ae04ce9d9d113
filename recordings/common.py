"""What every part of the data layer shares: the one error type, opening HDF5, and writing a synthetic
dataset as a whole (a new folder filled in a temp folder beside it, then renamed; byte-stable .npz)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import zipfile

import h5py
import numpy as np

import config


class DataError(Exception):
    """Bad input: the message is one line naming the file and what is wrong with it."""


def open_hdf5(path: str, what: str = "file") -> h5py.File:
    """h5py.File(path, "r"); DataError with one line if it is missing or not readable HDF5."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such {what}")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({str(e).splitlines()[0]})") from None


def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Uncompressed .npz with fixed zip timestamps (np.savez stamps the current time: same data, other
    bytes), written through config.atomic_path so readers never see half a file."""
    with config.atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as z:
        for name, a in arrays.items():
            with z.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w",
                        force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(a), allow_pickle=False)


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


TRUTH_DIR = "_synthetic_truth"
