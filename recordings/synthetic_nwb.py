"""Synthetic monkeys in NWB layout (both layouts of docs/data_formats.md §4, exactly the HDF5 paths the
reader reads), from a known shared latent per reach direction, with the ground truth beside them."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import h5py
import numpy as np
from scipy.ndimage import gaussian_filter1d

from recordings.common import TRUTH_DIR, save_npz, synthetic_spec, write_new_folder
from recordings.nwb import BEHAVIOR, ELECTRODES, TRIALS


@dataclass
class NWBSynthSpec:
    """What write_synthetic_nwb writes. monkeys: (name, layout "688"|"maze", units, areas, role) with role
    "train", "heldout" or "control" (spikes driven by a random reach latent per trial, not the condition)."""

    monkeys: tuple[tuple[str, str, int, tuple[str, ...], str], ...]
    sessions: int = 2
    trials: int = 120
    conditions: int = 8               # reach directions 2 pi c / conditions
    fail_fraction: float = 0.1        # trials with result "A"/"F" (success False): no reach
    behaviour_hz: float = 1000.0
    lead_ms: float = 60.0             # neurons lead the kinematics by this much
    reach_s: float = 0.3              # minimum-jerk reach duration
    reach_mm: float = 80.0
    drift: float = 0.15               # per-session change of log-baselines and tuning gains
    partial_units: int = 2            # units per file observed only in the first half of the session
    spike_dt: float = 0.005           # rate held constant over this step (exact piecewise-constant Poisson)
    # preferred directions (PD) come from one non-uniform density shared by every monkey (M1's PDs are
    # not uniform, and the bias has the same axis in different monkeys: Scott et al. 2001, Naselaris et al.
    # 2006): p(phi) ~ 1 + a1 cos(phi - m1) + a2 cos(2 (phi - m2)), (a1, m1 deg, a2, m2 deg); each monkey's
    # density is turned by its own N(0, pd_jitter_deg). With a uniform density (0, 0, 0, 0) the
    # population of a monkey whose units are unknown carries no information about the reach direction.
    pd_density: tuple[float, float, float, float] = (0.6, 30.0, 0.35, 100.0)
    pd_jitter_deg: float = 10.0
    # peak speed x (1 + a cos(2 (theta - axis))), the same arm mechanics in every monkey (reach_latent);
    # units are also tuned to speed regardless of direction (Moran & Schwartz 1999)
    speed_anisotropy: float = 0.25
    speed_axis_deg: float = 60.0
    # The second family ("monkey2") breaks what the first shares; each default below is the first family's,
    # so that it is written byte for byte as before. All their draws come from a stream of their own.
    # pd_density_mode "per_monkey": each monkey draws its own density, a1, a2 ~ U(0, pd_amplitude_max) and
    # axes m1, m2 ~ U(0, 360) deg (uniform to bimodal, no axis shared between monkeys)
    pd_density_mode: str = "shared"
    pd_amplitude_max: float = 0.8
    lead_ms_range: tuple[float, float] | None = None   # per-unit lead ~ U(lo, hi) ms instead of lead_ms
    turnover: float = 0.0             # fraction of units replaced by new ones (new tuning, new baseline) in
                                      # each later session of a monkey, on the replaced unit's electrode
    baseline_hz: tuple[float, float] = (4.0, 20.0)     # baseline rates ~ U(lo, hi) Hz
    isi_shape: float = 1.0            # gamma-ISI renewal process of this shape (time rescaling) (1: Poisson)
    # units the velocity (and position) values are stored in, cycling over the files in writing order;
    # () : 000688 files in cm/s with conversion 10 to mm/s, MC_Maze files in mm/s (the first family)
    velocity_units: tuple[str, ...] = ()
    # the unit attribute written, cycling over the files: "" the true one; else this string with conversion
    # 1, whatever the values' scale (real MC_Maze files say "m" over values on the mm scale)
    unit_attribute: tuple[str, ...] = ()

    def __post_init__(self):
        problems = [f"pd_density_mode {self.pd_density_mode!r} (shared | per_monkey)"
                    for _ in [0] if self.pd_density_mode not in ("shared", "per_monkey")]
        problems += [f"velocity unit {u!r} ({' | '.join(UNIT_SCALE)})" for u in self.velocity_units
                     if u not in UNIT_SCALE]
        problems += [f"{k} {v}" for k, v, ok in (("isi_shape", self.isi_shape, self.isi_shape > 0),
                                                  ("turnover", self.turnover, 0 <= self.turnover <= 1))
                     if not ok]
        if problems:
            raise ValueError("NWBSynthSpec: " + "; ".join(problems))


UNIT_SCALE = {"mm/s": 1.0, "cm/s": 0.1, "m/s": 0.001}     # stored value = velocity in mm/s x this


NWB_SYNTH_PRESETS = {
    # four training monkeys: an identity-free encoder generalises to a new population only after it has
    # seen several (with C and J alone the held-out monkey's zero-shot d was about half of this set's)
    "monkey": dict(monkeys=(("C", "688", 90, ("M1", "PMd"), "train"),
                            ("J", "maze", 120, ("M1", "PMd"), "train"),
                            ("K", "688", 100, ("M1", "PMd"), "train"),
                            ("L", "688", 70, ("M1",), "train"),
                            ("M", "688", 60, ("M1",), "heldout"),
                            ("T", "688", 40, ("M1", "PMd"), "control"))),
}
# the second family: the same monkeys, roles and sizes, without what lets an identity-free encoder read the
# reach direction (its own PD density per monkey, peak speed independent of direction), with unit-specific
# leads, a third of the units replaced between sessions, low rates, renewal spiking more regular than
# Poisson, and files that store the velocity in different units, some with a wrong unit attribute
NWB_SYNTH_PRESETS["monkey2"] = dict(
    NWB_SYNTH_PRESETS["monkey"], sessions=2, pd_density_mode="per_monkey", pd_amplitude_max=0.8,
    speed_anisotropy=0.0, lead_ms_range=(0.0, 150.0), turnover=0.3, baseline_hz=(1.0, 8.0), isi_shape=3.0,
    velocity_units=("mm/s", "cm/s", "m/s"), unit_attribute=("", "m/s"))
LATENT_K = 5                          # (vx, vy, prep_x, prep_y, speed), each ~unit peak


def reach_latent(t: np.ndarray, theta: np.ndarray, reach_s: float, speed_anisotropy: float = 0.0,
                 speed_axis_deg: float = 0.0) -> np.ndarray:
    """The shared latent (trials, K, T) at times t (trials, T) s from movement onset, for reach directions
    theta (trials,): a minimum-jerk out-and-back speed profile along theta (the velocity readout), a
    preparatory bump pointing at the target, peaking 150 ms before onset, and the speed itself. The peak
    speed depends on the direction as 1 + speed_anisotropy cos(2 (theta - axis)): the arm's inertia is
    anisotropic, so reaches along its low-inertia axis are faster (Gordon et al. 1994)."""
    def speed(x):
        tau = np.clip(x / reach_s, 0, 1)
        return 30 * tau**2 * (1 - tau) ** 2 / 1.875          # peak 1
    amplitude = 1 + speed_anisotropy * np.cos(2 * (theta - np.radians(speed_axis_deg)))
    s = amplitude[:, None] * (speed(t) - speed(t - 0.5))   # out, then back 500 ms later
    prep = np.exp(-0.5 * ((t + 0.15) / 0.12) ** 2)
    u = np.stack([np.cos(theta), np.sin(theta)], 1)[:, :, None]                  # (trials, 2, 1)
    return np.concatenate([s[:, None] * u, prep[:, None] * u, np.abs(s)[:, None]], 1)


def write_synthetic_nwb(root: str, preset: str = "monkey", seed: int = 0, **overrides) -> list[str]:
    """Write NWB-layout HDF5 files under root/sub-<monkey>/ plus root/_synthetic_truth/{config.json,
    truth.npz}; return the files. overrides: any NWBSynthSpec field. Same (preset, seed, overrides) -> same
    bytes; written to a temp folder beside root and renamed: never half a dataset.

    Model: per trial the latent z = reach_latent(t - onset, direction); velocity (mm/s) = peak speed x gain
    x z[:2]; unit n of monkey m, session s: rate = exp(b_n + drift_b_n s + (1 + drift_g_n s) c_n . z(t +
    lead)) with c_n from the shared preferred-direction density (_tuning; the control monkey's z uses a random
    direction per trial); spikes Poisson at that rate. The second family ("monkey2") changes this per
    NWBSynthSpec's knobs: the density per monkey, a lead per unit, units replaced between sessions, gamma
    renewal spiking, velocity stored in other units under possibly wrong unit attributes."""
    spec = synthetic_spec(NWBSynthSpec, NWB_SYNTH_PRESETS, preset, overrides)
    return write_new_folder(root, lambda tmp: _write_all(tmp, spec, preset, seed))


def _write_all(out: str, spec: NWBSynthSpec, preset: str, seed: int) -> list[str]:
    files, truth, info = [], {}, {}
    t_lat = np.arange(-0.5, 1.0, 0.005)
    theta_c = 2 * np.pi * np.arange(spec.conditions) / spec.conditions
    truth["latent"] = reach_latent(np.tile(t_lat, (spec.conditions, 1)), theta_c, spec.reach_s,
                                   spec.speed_anisotropy, spec.speed_axis_deg)
    truth["latent_t"] = t_lat
    for m, (name, layout, n_units, areas, role) in enumerate(spec.monkeys):
        rng = np.random.default_rng([seed, m])
        extra = np.random.default_rng([seed, m, 0])        # the second family's draws: rng's stream unchanged
        density = (tuple(spec.pd_density) if spec.pd_density_mode == "shared" else
                   (float(extra.uniform(0, spec.pd_amplitude_max)), float(extra.uniform(0, 360)),
                    float(extra.uniform(0, spec.pd_amplitude_max)), float(extra.uniform(0, 360))))
        b = np.log(rng.uniform(*spec.baseline_hz, n_units))
        turn = np.radians(rng.normal(0, spec.pd_jitter_deg))
        pool = dict(b=b, c=_tuning(rng, n_units, density, turn),
                    drift_b=rng.normal(0, spec.drift, n_units), drift_g=rng.normal(0, spec.drift, n_units),
                    area=np.array([areas[i % len(areas)] for i in rng.permutation(n_units)]),
                    lead=(np.full(n_units, float(spec.lead_ms)) if spec.lead_ms_range is None
                          else extra.uniform(*spec.lead_ms_range, n_units)))
        slots = _unit_slots(pool, n_units, spec, extra, density, turn)
        info[name] = {"layout": layout, "role": role, "units": n_units, "areas": list(areas), "files": [],
                      "pd_density": list(density), "pd_turn_deg": float(np.degrees(turn)),
                      "velocity_units": [], "unit_attribute": []}
        for s in range(spec.sessions):
            rel = (f"sub-{name}/sub-{name}_ses-CO-2024010{s + 1}_behavior+ecephys.nwb" if layout == "688"
                   else f"sub-{name}/sub-{name}_ses-full{s + 1}_desc-train_behavior+ecephys.nwb")
            os.makedirs(os.path.join(out, f"sub-{name}"), exist_ok=True)
            units = {k: v[slots[s]] for k, v in pool.items()}
            stored = _stored_units(spec, len(files))
            arrays = _write_session(os.path.join(out, rel), spec, name, layout, role, s, units,
                                    theta_c, np.random.default_rng([seed, m, s + 1]), stored)
            arrays.update(unit_identity=slots[s], lead_ms=units["lead"],
                          log_baseline=units["b"] + units["drift_b"] * s,
                          tuning=(1 + units["drift_g"][:, None] * s) * units["c"])
            truth.update({f"{rel}/{k}": v for k, v in arrays.items()})
            info[name]["files"].append(rel)
            info[name]["velocity_units"].append(stored[0])
            info[name]["unit_attribute"].append(stored[1])
            files.append(rel)
    os.makedirs(os.path.join(out, TRUTH_DIR))
    save_npz(os.path.join(out, TRUTH_DIR, "truth.npz"), truth)
    by_role = {r: sorted(n for n in info if info[n]["role"] == r) for r in ("train", "heldout", "control")}
    with open(os.path.join(out, TRUTH_DIR, "config.json"), "w") as f:
        json.dump({"preset": preset, "seed": seed, "spec": dataclasses.asdict(spec), "monkeys": info,
                   **by_role, "files": files, "latent_k": LATENT_K},
                  f, indent=1, sort_keys=True)
    return files


def _unit_slots(pool: dict, n: int, spec: NWBSynthSpec, rng: np.random.Generator, density: tuple,
                turn: float) -> list[np.ndarray]:
    """Which unit of `pool` each of a monkey's n recorded units is in every session: session 0 records units
    0..n-1; each later session replaces round(turnover n) of the previous session's units (chosen at random)
    by new ones appended to pool (in place): new baseline, tuning (same density), drift and lead; same
    electrode, so same area."""
    slots = [np.arange(n)]
    k = int(round(spec.turnover * n))
    for _ in range(1, spec.sessions):
        current = slots[-1].copy()
        if k:
            replaced = rng.choice(n, k, replace=False)
            new = dict(b=np.log(rng.uniform(*spec.baseline_hz, k)), c=_tuning(rng, k, density, turn),
                       drift_b=rng.normal(0, spec.drift, k), drift_g=rng.normal(0, spec.drift, k),
                       area=pool["area"][current[replaced]],
                       lead=(np.full(k, float(spec.lead_ms)) if spec.lead_ms_range is None
                             else rng.uniform(*spec.lead_ms_range, k)))
            current[replaced] = len(pool["b"]) + np.arange(k)
            for key, v in new.items():
                pool[key] = np.concatenate([pool[key], v])
        slots.append(current)
    return slots


def _stored_units(spec: NWBSynthSpec, index: int) -> tuple[str, str]:
    """(unit the velocity values are stored in, unit attribute written) of the index-th file; ("", "") for
    the first family's fixed units."""
    if not spec.velocity_units:
        return "", ""
    unit = spec.velocity_units[index % len(spec.velocity_units)]
    said = spec.unit_attribute[index % len(spec.unit_attribute)] if spec.unit_attribute else ""
    return unit, said or unit


def _tuning(rng: np.random.Generator, n: int, density: tuple, turn: float) -> np.ndarray:
    """(n, LATENT_K) tuning vectors: unit n drives with gain_v (cos phi, sin phi) on the velocity latent,
    gain_p (cos phi', sin phi') on the preparatory one and N(0.5, 0.5) on the speed, phi from the PD density
    (a1, m1 deg, a2, m2 deg) turned by `turn` rad (rejection sampling), phi' = phi + N(0, 30 deg), gains
    Gamma(4, 3/8) (mean 1.5)."""
    a1, m1, a2, m2 = density
    phi = np.empty(0)
    while len(phi) < n:
        cand = rng.uniform(0, 2 * np.pi, 4 * n)
        angle = cand - turn
        d = 1 + a1 * np.cos(angle - np.radians(m1)) + a2 * np.cos(2 * (angle - np.radians(m2)))
        phi = np.concatenate([phi, cand[rng.uniform(0, 1 + abs(a1) + abs(a2), 4 * n) < d]])
    phi = phi[:n]
    phi_prep = phi + rng.normal(0, np.radians(30), n)
    gain_v, gain_p = rng.gamma(4, 0.375, n), rng.gamma(4, 0.375, n)
    return np.stack([gain_v * np.cos(phi), gain_v * np.sin(phi), gain_p * np.cos(phi_prep),
                     gain_p * np.sin(phi_prep), rng.normal(0.5, 0.5, n)], 1)


def _trial_times(spec: NWBSynthSpec, rng: np.random.Generator, success: np.ndarray) -> dict[str, np.ndarray]:
    """Trial events (s): start, target on +0.2, go cue after a 0.3-0.6 s delay, onset 0.15-0.3 s after it
    (NaN when failed), stop 0.9 s after onset (0.6 s after the go cue when failed), 0.1-0.3 s gaps."""
    n = len(success)
    delay, rt, gap = rng.uniform(0.3, 0.6, n), rng.uniform(0.15, 0.3, n), rng.uniform(0.1, 0.3, n)
    length = 0.2 + delay + np.where(success, rt + 0.9, 0.6)
    start = 0.5 + np.concatenate([[0], np.cumsum(length + gap)[:-1]])
    go = start + 0.2 + delay
    return dict(start_time=start, target_on_time=start + 0.2, go_cue_time=go, stop_time=start + length,
                onset=np.where(success, go + rt, np.nan))


def _latent_on(grid: np.ndarray, onset: np.ndarray, theta: np.ndarray, gain: np.ndarray,
               spec: NWBSynthSpec) -> np.ndarray:
    """The latent of every trial (x its gain) on a session time grid: (T,) s -> (T, K); zero between."""
    z = np.zeros((len(grid), LATENT_K))
    dt = grid[1] - grid[0]
    n = int(round(1.6 / dt))
    for o, th, g in zip(onset.tolist(), theta.tolist(), gain.tolist(), strict=True):
        if np.isfinite(o):
            i = max(int(np.searchsorted(grid, o - 0.5)), 0)
            t = grid[i:i + n] - o
            z[i:i + len(t)] += g * reach_latent(t[None], np.array([th]), spec.reach_s, spec.speed_anisotropy,
                                                spec.speed_axis_deg)[0].T
    return z


def _write_session(path, spec, name, layout, role, s, neurons, theta_c, rng,
                   stored: tuple[str, str]) -> dict[str, np.ndarray]:
    n = spec.trials
    success = rng.random(n) >= spec.fail_fraction
    success[0] = True
    cond = rng.permutation(np.arange(n) % spec.conditions)      # balanced directions, shuffled
    ev = _trial_times(spec, rng, success)
    gain = rng.uniform(0.85, 1.15, n)
    end = ev["stop_time"][-1] + 0.5
    # behaviour: velocity = a fixed readout of the latent, plus slow jitter
    bt = np.arange(int(end * spec.behaviour_hz)) / spec.behaviour_hz
    z_b = _latent_on(bt, ev["onset"], theta_c[cond], gain, spec)
    peak = 1.875 * spec.reach_mm / spec.reach_s
    jitter = gaussian_filter1d(rng.normal(0, 20, (len(bt), 2)), 0.02 * spec.behaviour_hz, axis=0)
    vel = peak * z_b[:, :2] + jitter
    pos = np.cumsum(vel, 0) / spec.behaviour_hz
    # spikes: the control monkey's neurons follow a random direction per trial, not the condition
    theta_spk = rng.uniform(0, 2 * np.pi, n) if role == "control" else theta_c[cond]
    grid = np.arange(0, end, spec.spike_dt)
    per_unit = spec.lead_ms_range is not None
    z = _latent_on(grid + (0.0 if per_unit else spec.lead_ms / 1000), ev["onset"], theta_spk, gain, spec)
    half = np.zeros(len(neurons["b"]), bool)
    half[rng.choice(len(half), spec.partial_units, replace=False)] = True
    spikes, obs = [], []
    for u in range(len(half)):
        if per_unit:                  # this unit's own lead: its drive at t is the latent at t + lead
            tuned = np.interp(grid + neurons["lead"][u] / 1000, grid, z @ neurons["c"][u])
            drive = neurons["b"][u] + neurons["drift_b"][u] * s + (1 + neurons["drift_g"][u] * s) * tuned
        else:                         # (the first family's expression, operation for operation)
            drive = (neurons["b"][u] + neurons["drift_b"][u] * s
                     + (1 + neurons["drift_g"][u] * s) * z @ neurons["c"][u])
        st = _spike_train(rng, np.exp(drive), grid, spec.spike_dt, spec.isi_shape)
        stop = end / 2 if half[u] else end
        spikes.append(st[st < stop])
        obs.append([0.0, stop])
    with h5py.File(path, "w") as f:
        f.attrs["namespace"], f.attrs["neurodata_type"], f.attrs["nwb_version"] = "core", "NWBFile", "2.5.0"
        f["identifier"] = f"synthetic-{name}-{s}"
        f["session_id"] = f"{name}-session{s + 1}"
        f["session_start_time"] = "2024-01-01T00:00:00"
        f["general/subject/subject_id"] = name
        f["general/subject/species"] = "Macaca mulatta"
        el = f.create_group(ELECTRODES)
        el["id"] = np.arange(len(half))
        el.create_dataset("group_name", data=neurons["area"].astype(object), dtype=h5py.string_dtype())
        el.create_dataset("location", data=neurons["area"].astype(object), dtype=h5py.string_dtype())
        un = f.create_group("units")
        un["id"] = np.arange(len(half))
        un["spike_times"] = np.concatenate(spikes)
        un["spike_times_index"] = np.cumsum([len(x) for x in spikes])
        un["obs_intervals"] = np.array(obs)
        un["obs_intervals_index"] = np.arange(1, len(half) + 1)
        un["electrodes"] = np.arange(len(half))
        un["electrodes_index"] = np.arange(1, len(half) + 1)
        tr = f.create_group(TRIALS.lstrip("/"))
        tr["id"] = np.arange(n)
        for k in ("start_time", "stop_time", "target_on_time", "go_cue_time"):
            tr[k] = ev[k]
        unit, said = stored
        scale = UNIT_SCALE[unit] if unit else 1.0
        if layout == "688":
            tr["target_id"] = cond
            tr["target_dir"] = np.degrees(theta_c[cond])
            failed = np.where(rng.random(n) < 0.5, "A", "F")
            tr.create_dataset("result", data=np.where(success, "R", failed).astype(object),
                              dtype=h5py.string_dtype())
            beh = f.create_group(BEHAVIOR.lstrip("/"))
            cp = beh.create_group("Position/cursor_pos")
            if unit:                  # in `unit`, conversion 1, the attribute `said` (maybe wrong)
                d = cp.create_dataset("data", data=(pos * scale).astype(np.float32))
                d.attrs.update(conversion=1.0, offset=0.0, unit=said.removesuffix("/s"))
                cp["timestamps"] = bt
                d = beh.create_dataset("Velocity/cursor_vel/data", data=(vel * scale).astype(np.float32))
                d.attrs.update(conversion=1.0, offset=0.0, unit=said)
            else:                     # stored in cm(/s) with conversion 10 -> mm(/s); position with an offset
                d = cp.create_dataset("data", data=((pos + 5.0) / 10).astype(np.float32))
                d.attrs.update(conversion=10.0, offset=-5.0, unit="mm")
                cp["timestamps"] = bt
                d = beh.create_dataset("Velocity/cursor_vel/data", data=(vel / 10).astype(np.float32))
                d.attrs.update(conversion=10.0, offset=0.0, unit="mm/s")
        else:
            tr["move_onset_time"] = ev["onset"]
            tr["success"] = success
            tr["trial_type"], tr["trial_version"], tr["maze_id"] = cond + 1, np.zeros(n, np.int64), cond
            tr.create_dataset("split", data=np.full(n, "train", object), dtype=h5py.string_dtype())
            un["heldout"] = np.zeros(len(half), bool)
            beh = f.create_group(BEHAVIOR.lstrip("/"))
            d = beh.create_dataset("hand_vel/data", data=(vel * scale if unit else vel).astype(np.float32))
            d.attrs.update(conversion=1.0, unit=said or "mm/s")
            beh["hand_vel/timestamps"] = bt
            d = beh.create_dataset("hand_pos/data", data=(pos * scale if unit else pos).astype(np.float32))
            d.attrs.update(conversion=1.0, unit=said.removesuffix("/s") or "mm")
            beh.create_dataset("hand_pos/starting_time", data=0.0).attrs["rate"] = spec.behaviour_hz
    return dict(condition=cond, success=success, onset=ev["onset"], gain=gain, spike_direction=theta_spk,
                partial_units=np.flatnonzero(half))


def _spike_train(rng: np.random.Generator, rate: np.ndarray, grid: np.ndarray, dt: float,
                 shape: float) -> np.ndarray:
    """Sorted spike times from a rate (Hz) held constant over each step [grid_i, grid_i + dt). shape 1: an
    inhomogeneous Poisson process (counts per step, times uniform inside it); otherwise a gamma renewal
    process by time rescaling: intervals Gamma(shape, 1 / shape) (mean 1, CV 1 / sqrt(shape)) in rescaled
    time L(t) = integral of the rate, mapped back through L^-1 (piecewise linear). The first event is the
    first interval from 0, not from the stationary distribution: the process starts renewed at time 0."""
    if shape == 1:
        counts = rng.poisson(rate * dt)
        return np.sort(np.repeat(grid, counts) + rng.random(counts.sum()) * dt)
    cum = np.concatenate([[0.0], np.cumsum(rate * dt)])
    edges = np.concatenate([grid, [grid[-1] + dt]])
    total = cum[-1]
    tau = np.cumsum(rng.gamma(shape, 1 / shape, int(total + 6 * np.sqrt(total) + 20)))
    while tau[-1] < total:
        more = rng.gamma(shape, 1 / shape, int(np.sqrt(total)) + 20)
        tau = np.concatenate([tau, tau[-1] + np.cumsum(more)])
    return np.interp(tau[tau < total], cum, edges)
