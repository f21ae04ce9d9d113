"""Monkey motor cortex from NWB files with plain h5py: a reader for both layouts of docs/data_formats.md §4
(DANDI 000688 Perich & Miller centre-out, NLB MC_Maze 000128/000138), and `Monkey`, one session as a PNBA
animal (recordings.animal.BehaviourAnimal; the stimulus is the hand/cursor velocity).

    s = open_session("sub-C/sub-C_ses-CO-20240101_behavior+ecephys.nwb")    # Session: binned trials
    animal = Monkey(path)                                                   # what train/extract read
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import h5py
import numpy as np
import torch

from recordings.common import DataError, open_hdf5

BEHAVIOR = "/processing/behavior"
# (velocity, position) per layout; a velocity series without a time base takes its position's (000688)
LAYOUTS = {"maze": (f"{BEHAVIOR}/hand_vel", f"{BEHAVIOR}/hand_pos"),
           "688": (f"{BEHAVIOR}/Velocity/cursor_vel", f"{BEHAVIOR}/Position/cursor_pos")}
ELECTRODES = "/general/extracellular_ephys/electrodes"
TRIALS = "/intervals/trials"
# Movement onset where the file has none (000688): pyaldata-style threshold on peak-normalised speed. The
# speed must first exceed ONSET_DETECT x its peak (go cue -> trial end; robust to rest jitter); onset is
# where it last rose through ONSET_RISE x peak before that. For a bell-shaped reach of duration D this
# lags the true start by ~0.09 D (about 25 ms for a 300 ms reach).
ONSET_DETECT, ONSET_RISE = 0.5, 0.1
# The one behaviour space of NWB monkeys: what the model sees, and what extract.py stores (reps.py).
# Scale-free, so the velocity's unit in the file (mm/s, cm/s, m/s, whatever its unit attribute says) never
# matters.
BEHAVIOUR_SPACE = "velocity / session RMS speed (train tier)"


@dataclass
class Session:
    """One NWB file cut into successful trials aligned on movement onset.

    spikes (trials, bins, units) float32 counts, NaN where the unit was not observed (obs_intervals);
    velocity / position (trials, bins, D) float32 bin averages after conversion/offset (position None unless
    asked); condition (trials,) str: "target<id>" (000688) or "maze<trial_type>.<trial_version>" (MC_Maze);
    trial (trials,) int64 row in /intervals/trials; onset (trials,) float64 s; areas (units,) "M1"/"PMd"/...;
    dropped: trials left out, by reason (failed, no_condition, no_onset, outside: the window leaves the
    behaviour recording, nan_velocity: a bin of the window holds velocity samples but none finite);
    n_spikes (units,): spikes of each unit in the whole file (0: a unit with no spikes)."""

    path: str
    subject: str
    session: str
    layout: str
    spikes: np.ndarray
    velocity: np.ndarray
    position: np.ndarray | None
    condition: np.ndarray
    trial: np.ndarray
    onset: np.ndarray
    unit_ids: np.ndarray
    areas: np.ndarray
    behaviour_unit: str
    bin_ms: float
    window_ms: tuple[float, float]
    dropped: dict[str, int]
    n_spikes: np.ndarray | None = None

    @property
    def observed(self) -> np.ndarray:
        """(trials, bins, units) bool: the unit was recorded over the whole bin."""
        return ~np.isnan(self.spikes)


def _fail(fname: str, path: str, problem: str) -> DataError:
    return DataError(f"{fname}: {path}: {problem}")


def _read(f: h5py.File, path: str, fname: str) -> np.ndarray:
    """The whole dataset at path (strings decoded); one-line DataError naming file and path otherwise."""
    try:
        ds = f[path]
        if not isinstance(ds, h5py.Dataset):
            raise _fail(fname, path, "is a group, expected a dataset")
        return np.asarray(ds.asstr()[()] if h5py.check_string_dtype(ds.dtype) else ds[()])
    except KeyError:
        raise _fail(fname, path, "missing") from None
    except (OSError, RuntimeError, ValueError) as e:
        raise _fail(fname, path, f"unreadable ({str(e).splitlines()[0]})") from None


def _ragged(f: h5py.File, path: str, fname: str) -> list[np.ndarray]:
    """A ragged column X + X_index (cumulative exclusive end offsets) as one array per row."""
    values, ends = _read(f, path, fname), _read(f, path + "_index", fname).astype(np.int64)
    if ends.size and (np.any(np.diff(ends) < 0) or ends[-1] > len(values)):
        raise _fail(fname, path + "_index", f"offsets do not index {len(values)} values")
    return np.split(values, ends[:-1]) if ends.size else []


def _series(f: h5py.File, path: str, fname: str, times_from: str | None = None) -> tuple[np.ndarray, ...]:
    """A TimeSeries: times (T,) s and data (T, D) float64 with conversion and offset applied, and its unit.
    Time base: `timestamps`, else `starting_time` + its `rate`, else that of the series `times_from`."""
    data = _read(f, f"{path}/data", fname).astype(np.float64)
    attrs = f[f"{path}/data"].attrs
    data = data.reshape(len(data), -1) * float(attrs.get("conversion", 1.0)) + float(attrs.get("offset", 0.0))
    unit = attrs.get("unit", "")
    unit = unit.decode() if isinstance(unit, bytes) else str(unit)
    g = f[path]
    if "timestamps" in g:
        times = _read(f, f"{path}/timestamps", fname).astype(np.float64)
    elif "starting_time" in g:
        rate = g["starting_time"].attrs.get("rate")
        if rate is None:
            raise _fail(fname, f"{path}/starting_time", "no rate attribute")
        times = float(_read(f, f"{path}/starting_time", fname)) + np.arange(len(data)) / float(rate)
    elif times_from is not None and times_from in f:
        times = _series(f, times_from, fname)[0]
    else:
        raise _fail(fname, path, "no timestamps or starting_time")
    if len(times) != len(data) or len(times) < 2 or np.any(np.diff(times) < 0):
        raise _fail(fname, path, f"{len(times)} timestamps (must be increasing) for {len(data)} samples")
    return times, data, unit


def _bin_average(times: np.ndarray, data: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Mean of the finite samples in each bin [e_k, e_k+1) via cumulative sums: (trials, bins+1) edges ->
    (trials, bins, D). A bin holding no finite sample (slow behaviour, narrow bins, a NaN gap) takes the
    linear interpolation of the finite samples at its centre."""
    ok = np.isfinite(data)
    zero = np.zeros((1, data.shape[1]))
    cs = np.concatenate([zero, np.cumsum(np.where(ok, data, 0), 0)])
    cn = np.concatenate([zero, np.cumsum(ok, 0)])
    i = np.searchsorted(times, edges, side="left")
    n = cn[i[:, 1:]] - cn[i[:, :-1]]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (cs[i[:, 1:]] - cs[i[:, :-1]]) / n
    centres = (edges[:, 1:] + edges[:, :-1]) / 2
    for d in np.flatnonzero((n == 0).any((0, 1))):
        empty = n[..., d] == 0
        out[..., d][empty] = np.interp(centres[empty], times[ok[:, d]], data[ok[:, d], d])
    return out


def _nan_bins(times: np.ndarray, data: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(trials,) bool: some bin [e_k, e_k+1) of the trial holds samples of data (T, D) but, in some dimension,
    no finite one: its value would be made up (a bin with no sample at all is slow sampling, not damage)."""
    if not len(edges):
        return np.zeros(0, bool)
    cn = np.concatenate([np.zeros((1, data.shape[1])), np.cumsum(np.isfinite(data), 0)])
    i = np.searchsorted(times, edges, side="left")
    samples, finite = i[:, 1:] - i[:, :-1], cn[i[:, 1:]] - cn[i[:, :-1]]
    return ((samples[..., None] > 0) & (finite == 0)).any((1, 2))


def _has_nan(times: np.ndarray, data: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """(trials,) bool: a sample of data (T, D) in [start, stop] is not finite."""
    bad = np.concatenate([[0], np.cumsum(~np.isfinite(data).all(1))])
    with np.errstate(invalid="ignore"):
        lo, hi = np.searchsorted(times, start, "left"), np.searchsorted(times, stop, "right")
    return bad[hi] - bad[lo] > 0


def movement_onset(times: np.ndarray, velocity: np.ndarray, go: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """Movement onset (trials,) s from velocity (T, D) sampled at times (T,), searched from go cue to stop
    (ONSET_DETECT / ONSET_RISE above); NaN where the trial has no samples or no movement."""
    speed = np.linalg.norm(velocity, axis=1)
    out = np.full(len(go), np.nan)
    for k, (lo, hi) in enumerate(np.searchsorted(times, np.stack([go, stop], 1)).tolist()):
        s = speed[lo:hi]
        if s.size < 2 or not np.isfinite(s).all() or s.max() <= 0:
            continue
        cross = int(np.argmax(s >= ONSET_DETECT * s.max()))
        below = np.flatnonzero(s[:cross] < ONSET_RISE * s.max())
        out[k] = times[lo + (below[-1] + 1 if below.size else 0)]
    return out


def _area(name: str) -> str:
    low = name.lower()
    return "PMd" if "pmd" in low else "M1" if "m1" in low else name


def _unit_areas(f: h5py.File, fname: str, n_units: int) -> np.ndarray:
    """Area per unit from the first electrode of each unit: electrode table group_name, else location."""
    if "/units/electrodes" not in f or ELECTRODES not in f:
        return np.full(n_units, "unknown", dtype=object)
    rows = (_ragged(f, "/units/electrodes", fname) if "/units/electrodes_index" in f
            else list(_read(f, "/units/electrodes", fname).reshape(-1, 1)))
    table = f[ELECTRODES]
    column = "group_name" if "group_name" in table else "location" if "location" in table else None
    if column is None or len(rows) != n_units or any(len(r) == 0 for r in rows):
        raise _fail(fname, "/units/electrodes", f"no group_name/location for each of {n_units} units")
    names = _read(f, f"{ELECTRODES}/{column}", fname)
    first = np.array([int(r[0]) for r in rows])
    if first.max() >= len(names):
        raise _fail(fname, "/units/electrodes", f"row {first.max()} beyond {len(names)} electrodes")
    return np.array([_area(str(names[i])) for i in first], dtype=object)


def _conditions(cols: dict, n: int) -> np.ndarray:
    """Condition label per trial ("" where the trial has none), from the first column set present."""
    if "target_id" in cols:
        t = cols["target_id"].astype(np.float64)
        return np.array(["" if not np.isfinite(v) else f"target{int(v)}" for v in t], dtype=object)
    if "target_dir" in cols:
        d = cols["target_dir"].astype(np.float64)
        return np.array(["" if not np.isfinite(v) else f"dir{v:g}" for v in d], dtype=object)
    if "trial_type" in cols and "trial_version" in cols:
        return np.array([f"maze{int(a)}.{int(b)}" for a, b in zip(cols["trial_type"], cols["trial_version"],
                                                                    strict=True)], dtype=object)
    if "maze_id" in cols:
        return np.array([f"maze{int(v)}" for v in cols["maze_id"]], dtype=object)
    return np.full(n, "", dtype=object)


def _text(f: h5py.File, path: str, fname: str, default: str) -> str:
    if path not in f:
        return default
    v = _read(f, path, fname)
    return str(v.reshape(-1)[0] if v.ndim else v) or default


def open_session(path: str, bin_ms: float = 20, window_ms: tuple[float, float] = (-250, 450),
                 area: str | None = None, position: bool = False) -> Session:
    """Read one NWB file (either layout of data_formats.md §4) into a Session of successful trials, binned at
    bin_ms over window_ms around movement onset, units restricted to `area` ("M1"/"PMd") if given. Trials
    whose window leaves the behaviour recording are dropped (counted in Session.dropped)."""
    fname = os.fspath(path)
    with open_hdf5(fname) as f:
        try:
            return _open(f, fname, bin_ms, window_ms, area, position)
        except (OSError, KeyError, RuntimeError) as e:     # damage met outside _read (attributes, links)
            raise DataError(f"{fname}: unreadable ({str(e).splitlines()[0]})") from None


def _open(f, fname, bin_ms, window_ms, area, position) -> Session:
    layout = next((k for k, (vel, _) in LAYOUTS.items() if vel in f), None)
    if layout is None:
        raise _fail(fname, BEHAVIOR, "no hand or cursor velocity")
    vel_path, pos_path = LAYOUTS[layout]
    times, vel, unit = _series(f, vel_path, fname, times_from=pos_path)
    pos = _series(f, pos_path, fname) if position else None

    if TRIALS not in f:
        raise _fail(fname, TRIALS, "missing")
    cols = {k: _read(f, f"{TRIALS}/{k}", fname) for k, v in f[TRIALS].items()
            if isinstance(v, h5py.Dataset) and v.ndim == 1 and not k.endswith("_index")}
    for k in ("start_time", "stop_time"):
        if k not in cols:
            raise _fail(fname, f"{TRIALS}/{k}", "missing")
    n = len(cols["start_time"])
    condition = _conditions(cols, n)
    ok = (cols["result"] == "R" if "result" in cols else
          cols["success"].astype(bool) if "success" in cols else np.ones(n, bool))
    has_cond = condition != ""
    nan_velocity = np.zeros(n, bool)
    if "move_onset_time" in cols:
        onset = cols["move_onset_time"].astype(np.float64)
    elif "go_cue_time" in cols:
        onset = np.full(n, np.nan)
        go, stop = cols["go_cue_time"][ok].astype(np.float64), cols["stop_time"][ok].astype(np.float64)
        onset[ok] = movement_onset(times, vel, go, stop)
        nan_velocity[ok] = ~np.isfinite(onset[ok]) & _has_nan(times, vel, go, stop)   # no onset: NaN speed
    else:
        raise _fail(fname, f"{TRIALS}/move_onset_time", "missing, and no go_cue_time to compute it from")
    lo, hi = window_ms[0] / 1000, window_ms[1] / 1000
    inside = (onset + lo >= times[0]) & (onset + hi <= times[-1])
    if pos is not None:
        inside &= (onset + lo >= pos[0][0]) & (onset + hi <= pos[0][-1])
    found = np.isfinite(onset)
    beyond = np.zeros(n, bool)      # no onset computed because the behaviour ends before the trial
    if "move_onset_time" not in cols:
        beyond = ~found & ~nan_velocity & ((cols["stop_time"] > times[-1]) | (cols["start_time"] < times[0]))
    n_bins = int(round((window_ms[1] - window_ms[0]) / bin_ms))
    candidate = ok & has_cond & found & inside
    edges = onset[candidate, None] + lo + np.arange(n_bins + 1) * (bin_ms / 1000)     # (trials, bins+1)
    nan_velocity[candidate] = _nan_bins(times, vel, edges)
    nan_velocity &= ok & has_cond
    dropped = {"failed": int((~ok).sum()), "no_condition": int((ok & ~has_cond).sum()),
               "no_onset": int((ok & has_cond & ~found & ~nan_velocity & ~beyond).sum()),
               "outside": int((ok & has_cond & ((found & ~inside) | beyond)).sum()),
               "nan_velocity": int(nan_velocity.sum())}
    keep = np.flatnonzero(candidate & ~nan_velocity)
    edges = edges[~nan_velocity[candidate]]
    spike_times = _ragged(f, "/units/spike_times", fname)
    unit_ids = (_read(f, "/units/id", fname).astype(np.int64) if "/units/id" in f
                else np.arange(len(spike_times)))
    areas = _unit_areas(f, fname, len(spike_times))
    units = np.flatnonzero(areas == area) if area is not None else np.arange(len(spike_times))
    if area is not None and units.size == 0:
        raise _fail(fname, ELECTRODES, f"no {area} units (areas: {', '.join(sorted(set(areas)))})")
    obs = _ragged(f, "/units/obs_intervals", fname) if "/units/obs_intervals" in f else None
    spikes = np.empty((len(keep), n_bins, len(units)), np.float32)
    for j, u in enumerate(units.tolist()):
        st = spike_times[u].astype(np.float64)
        if np.any(np.diff(st) < 0):
            st = np.sort(st)
        spikes[..., j] = np.diff(np.searchsorted(st, edges, side="left"), axis=1)
        if obs is not None:
            iv = obs[u].reshape(-1, 2)
            iv = iv[np.argsort(iv[:, 0])]
            k = np.searchsorted(iv[:, 0], edges[:, :-1], side="right") - 1
            seen = (k >= 0) & (edges[:, 1:] <= iv[np.maximum(k, 0), 1]) if len(iv) else np.zeros_like(k, bool)
            spikes[..., j][~seen] = np.nan
    subject = _text(f, "/general/subject/subject_id", fname, "unknown")
    stem = os.path.basename(fname).removesuffix(".nwb")
    return Session(path=fname, subject=subject, session=_text(f, "/session_id", fname, stem), layout=layout,
                   spikes=spikes, velocity=_bin_average(times, vel, edges).astype(np.float32),
                   position=None if pos is None else _bin_average(pos[0], pos[1], edges).astype(np.float32),
                   condition=condition[keep], trial=keep.astype(np.int64), onset=onset[keep],
                   unit_ids=unit_ids[units], areas=areas[units], behaviour_unit=unit, bin_ms=float(bin_ms),
                   window_ms=(float(window_ms[0]), float(window_ms[1])), dropped=dropped,
                   n_spikes=np.array([len(spike_times[u]) for u in units.tolist()], np.int64))


def find_nwb(paths: list[str]) -> list[str]:
    """The .nwb files named, or found (recursively, sorted) under the folders named."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(os.path.join(d, n) for d, _, names in os.walk(p) for n in names
                          if n.endswith(".nwb"))
        else:
            out.append(p)
    return out


def is_nwb_input(paths: list[str]) -> bool:
    """True if `data.py check` should read these as NWB files rather than Sensorium mouse folders."""
    return any(p.endswith(".nwb") for p in paths) or any(os.path.isdir(p) and find_nwb([p]) for p in paths)


def describe(sessions: list[Session]) -> dict:
    """What `data.py check --json` prints for NWB files: per monkey, per session: file, units per area,
    trials per condition, dropped trials by reason."""
    out = {"monkeys": {}}
    for s in sorted(sessions, key=lambda s: (s.subject, s.session, s.path)):
        areas, n_area = np.unique(s.areas.astype(str), return_counts=True)
        conds, n_cond = np.unique(s.condition.astype(str), return_counts=True)
        out["monkeys"].setdefault(s.subject, {})[s.session] = {
            "file": s.path, "layout": s.layout,
            "units": dict(zip(areas.tolist(), n_area.tolist(), strict=True)),
            "trials": len(s.trial), "conditions": dict(zip(conds.tolist(), n_cond.tolist(), strict=True)),
            "dropped": s.dropped}
    return out


def print_report(report: dict) -> None:
    for monkey, sessions in report["monkeys"].items():
        print(f"monkey {monkey}: {len(sessions)} session(s)")
        for name, s in sessions.items():
            units = ", ".join(f"{a} {k}" for a, k in s["units"].items())
            dropped = ", ".join(f"{r} {k}" for r, k in s["dropped"].items() if k) or "none"
            print(f"  {name} ({s['layout']}, {os.path.basename(s['file'])}): units {units}; "
                  f"{s['trials']} trials, dropped: {dropped}")
            print("    per condition: " + ", ".join(f"{c} {k}" for c, k in s["conditions"].items()))


# ---------------------------------------------------------------------------------------------
# One session as a PNBA animal
# ---------------------------------------------------------------------------------------------

ORACLE_EVERY = 5          # every 5th successful trial of each condition is held back from training


def animal_name(subject: str, session: str) -> str:
    """The animal key of a session: "<subject>-<session>" without the characters a key cannot hold."""
    name = session if session.startswith(subject) else f"{subject}-{session}"
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


class Monkey:
    """One NWB session as a PNBA animal (its units are its own, so it has its own readout), with the
    recording interface recordings.animal.BehaviourAnimal (Animal, plus condition labels, the kinematics
    and the raw spike counts).

    Trials are the successful ones of open_session, each `bins` long. Tiers: every ORACLE_EVERY-th trial of
    each condition (in trial order) is "oracle", the rest "train" -- Sensorium's name for repeated stimuli
    held out of training, so that validation and the stats scripts score both kinds of data the same way.
    The stimulus is the velocity (bins, D) divided by one scale per session, behaviour_scale (the RMS speed
    over the train tier, in the file's values; unsupervised, so a held-out monkey's comes from its own
    kinematics): BEHAVIOUR_SPACE, which no unit attribute, right or wrong, can change; responses are spike
    counts per bin. A unit not observed over a bin (NaN in the Session) is given its mean count over the
    train tier there and flagged in observed(), so that the Poisson loss leaves it out."""

    stimulus_kind = "behaviour"
    state_dim = 0                 # NWB sessions carry no recorded behavioural state beside the stimulus

    def __init__(self, path: str, bin_ms: float = 20, window_ms: tuple[float, float] = (-250, 450),
                 area: str | None = None):
        s = open_session(path, bin_ms, window_ms, area or None)
        if len(s.trial) == 0:
            why = ", ".join(f"{k} {v}" for k, v in s.dropped.items() if v) or "the table is empty"
            where = f" (NaN in {LAYOUTS[s.layout][0]}/data)" if s.dropped.get("nan_velocity") else ""
            raise DataError(f"{s.path}: {TRIALS}: no successful trial with a movement onset and finite "
                            f"velocity inside the behaviour recording (dropped: {why}){where}")
        silent = s.n_spikes == 0 if s.n_spikes is not None else np.zeros(s.spikes.shape[2], bool)
        seen = s.observed.any(axis=(0, 1)) & ~silent
        if not seen.any():
            raise DataError(f"{s.path}: /units: no unit has spikes and is observed in a trial window")
        # what the rest of the file can do without, left out and counted (train.py warns and writes it into
        # the run's config.json); failed trials are the task's, not damage
        counts = {"units_without_spikes": int(silent.sum()),
                  **{f"trials_{k}": v for k, v in s.dropped.items() if k != "failed"}}
        self.skipped = {k: v for k, v in counts.items() if v}
        self.session_data = s
        self.path, self.subject, self.session = s.path, s.subject, s.session
        self.name = animal_name(s.subject, s.session)
        self.units = np.flatnonzero(seen)     # units never observed in a window, or without spikes, left out
        self.n_neurons, self.bins = len(self.units), s.spikes.shape[1]
        rank = np.zeros(len(s.trial), np.int64)
        for c in np.unique(s.condition):
            rows = np.flatnonzero(s.condition == c)
            rank[rows] = np.arange(len(rows))
        self.tiers = np.where(rank % ORACLE_EVERY == ORACLE_EVERY - 1, "oracle", "train")
        self._trials = np.arange(len(s.trial))
        train = self.tiers == "train"
        spikes = s.spikes[:, :, self.units]
        unit_mean = np.nanmean(spikes[train] if train.any() else spikes, axis=(0, 1))
        self.mean_rate = np.nan_to_num(unit_mean).astype(np.float32)             # (N,) counts per bin
        self._observed = ~np.isnan(spikes)
        self._responses = np.where(self._observed, spikes, self.mean_rate).astype(np.float32)
        v = s.velocity[train] if train.any() else s.velocity
        self.behaviour_scale = float(np.sqrt(np.mean(np.sum(v ** 2, -1)))) or 1.0
        self._stimulus = (s.velocity / self.behaviour_scale).astype(np.float32)
        self.behaviour_dim = s.velocity.shape[-1]
        self.behaviour_space, self.behaviour_unit = BEHAVIOUR_SPACE, s.behaviour_unit
        self.coords, self.hidden_tiers = None, []

    def __repr__(self) -> str:
        return f"Monkey({self.name!r}, {self.n_neurons} units, {len(self._trials)} trials)"

    def skipped_line(self) -> str:
        """One line on what was left out of a damaged file ("" if nothing), naming where."""
        velocity = LAYOUTS[self.session_data.layout][0]
        what = {"units_without_spikes": "unit(s) without spikes (/units/spike_times)",
                "trials_nan_velocity": f"trial(s) with NaN velocity ({velocity}/data)",
                "trials_outside": f"trial(s) outside the behaviour recording ({BEHAVIOR})",
                "trials_no_onset": f"trial(s) without a movement onset ({TRIALS})",
                "trials_no_condition": f"trial(s) without a condition ({TRIALS})"}
        parts = [f"{v} {what.get(k, k)}" for k, v in self.skipped.items()]
        return f"{self.path}: skipped {', '.join(parts)}" if parts else ""

    def coords_tensor(self, device=None) -> None:
        return None

    @property
    def tiers_source(self) -> str:
        """Where the tiers come from, for messages: the trials table (tiers are cut from it here)."""
        return f"{self.path}: {TRIALS}"

    def source(self, i: int) -> str:
        """Where trial i comes from, for messages: the file and its row in /intervals/trials."""
        return f"{self.path}: /intervals/trials row {int(self.session_data.trial[int(i)])}"

    def trials(self, tiers=None, hidden: bool = True) -> np.ndarray:
        out = self._trials
        if tiers is not None:
            out = out[np.isin(self.tiers[out], [tiers] if isinstance(tiers, str) else list(tiers))]
        return out

    def valid_frames(self, i: int) -> int:
        return self.bins

    def is_hidden(self, i: int) -> bool:
        return False

    def condition(self, i: int) -> str:
        return str(self.session_data.condition[int(i)])

    def behaviour(self, i: int) -> np.ndarray:
        """Trial i's velocity (bins, D) in the file's values (after its conversion; in the unit the file
        states, behaviour_unit, if that is right), not normalised."""
        return self.session_data.velocity[int(i)]

    def normalised_behaviour(self, i: int) -> np.ndarray:
        """Trial i's velocity (bins, D) float32 in BEHAVIOUR_SPACE: the model's input, behaviour(i) /
        behaviour_scale. What extract.py stores and every decoder is fitted on."""
        return self._stimulus[int(i)]

    def observed(self, i: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(T, N) bool: the unit was recorded over the bin."""
        return torch.from_numpy(self._observed[int(i), start:stop])

    def state(self, i: int, start: int = 0, stop: int | None = None) -> None:
        """No recorded behavioural state (state_dim 0)."""
        return None

    def spike_counts(self, i: int) -> np.ndarray:
        """Trial i's spike counts (bins, N) float32 of the animal's units, NaN where a unit was not recorded
        over the bin (normalised() gives the unit's mean there instead)."""
        return np.where(self._observed[int(i)], self._responses[int(i)], np.nan).astype(np.float32)

    def normalised(self, i: int, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, ...]:
        """Bins [start, stop) of trial i: velocity / behaviour_scale (T, D) float32 and spike counts (T, N)
        float32 (unobserved bins at the unit's mean, see observed())."""
        stop = self.bins if stop is None else stop
        if not 0 <= start < stop <= self.bins:
            raise ValueError(f"{self.name} trial {i}: bins [{start}, {stop}) outside its {self.bins} bins")
        i = int(i)
        return (torch.from_numpy(self._stimulus[i, start:stop].copy()),
                torch.from_numpy(self._responses[i, start:stop].copy()))


def open_monkeys(paths: list[str], bin_ms: float = 20, window_ms: tuple[float, float] = (-250, 450),
                 area: str | None = None) -> list[Monkey]:
    """Every session of the .nwb files named or found under the folders named, as animals; DataError on a
    name given twice (two files with one session id)."""
    files = find_nwb(paths)
    if not files:
        raise DataError(f"{', '.join(paths)}: no .nwb files")
    monkeys = [Monkey(f, bin_ms, window_ms, area) for f in files]
    seen = {}
    for m in monkeys:
        if m.name in seen:
            raise DataError(f"{m.path}: session {m.name!r} again (also {seen[m.name]})")
        seen[m.name] = m.path
    return monkeys
