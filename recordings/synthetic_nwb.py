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
    direction per trial); spikes Poisson at that rate."""
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
        neurons = dict(b=np.log(rng.uniform(4, 20, n_units)), c=_tuning(rng, n_units, spec),
                       drift_b=rng.normal(0, spec.drift, n_units), drift_g=rng.normal(0, spec.drift, n_units),
                       area=np.array([areas[i % len(areas)] for i in rng.permutation(n_units)]))
        info[name] = {"layout": layout, "role": role, "units": n_units, "areas": list(areas), "files": []}
        for s in range(spec.sessions):
            rel = (f"sub-{name}/sub-{name}_ses-CO-2024010{s + 1}_behavior+ecephys.nwb" if layout == "688"
                   else f"sub-{name}/sub-{name}_ses-full{s + 1}_desc-train_behavior+ecephys.nwb")
            os.makedirs(os.path.join(out, f"sub-{name}"), exist_ok=True)
            arrays = _write_session(os.path.join(out, rel), spec, name, layout, role, s, neurons,
                                    theta_c, np.random.default_rng([seed, m, s + 1]))
            truth.update({f"{rel}/{k}": v for k, v in arrays.items()})
            info[name]["files"].append(rel)
            files.append(rel)
    os.makedirs(os.path.join(out, TRUTH_DIR))
    save_npz(os.path.join(out, TRUTH_DIR, "truth.npz"), truth)
    by_role = {r: sorted(n for n in info if info[n]["role"] == r) for r in ("train", "heldout", "control")}
    with open(os.path.join(out, TRUTH_DIR, "config.json"), "w") as f:
        json.dump({"preset": preset, "seed": seed, "spec": dataclasses.asdict(spec), "monkeys": info,
                   **by_role, "files": files, "latent_k": LATENT_K},
                  f, indent=1, sort_keys=True)
    return files


def _tuning(rng: np.random.Generator, n: int, spec: NWBSynthSpec) -> np.ndarray:
    """(n, LATENT_K) tuning vectors: unit n drives with gain_v (cos phi, sin phi) on the velocity latent,
    gain_p (cos phi', sin phi') on the preparatory one and N(0.5, 0.5) on the speed, phi from the shared PD
    density (rejection sampling, turned by this monkey's jitter), phi' = phi + N(0, 30 deg), gains
    Gamma(4, 3/8) (mean 1.5)."""
    a1, m1, a2, m2 = spec.pd_density
    turn = np.radians(rng.normal(0, spec.pd_jitter_deg))
    phi = np.empty(0)
    while len(phi) < n:
        cand = rng.uniform(0, 2 * np.pi, 4 * n)
        angle = cand - turn
        density = 1 + a1 * np.cos(angle - np.radians(m1)) + a2 * np.cos(2 * (angle - np.radians(m2)))
        phi = np.concatenate([phi, cand[rng.uniform(0, 1 + abs(a1) + abs(a2), 4 * n) < density]])
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


def _write_session(path, spec, name, layout, role, s, neurons, theta_c, rng) -> dict[str, np.ndarray]:
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
    z = _latent_on(grid + spec.lead_ms / 1000, ev["onset"], theta_spk, gain, spec)
    half = np.zeros(len(neurons["b"]), bool)
    half[rng.choice(len(half), spec.partial_units, replace=False)] = True
    spikes, obs = [], []
    for u in range(len(half)):
        drive = (neurons["b"][u] + neurons["drift_b"][u] * s
                 + (1 + neurons["drift_g"][u] * s) * z @ neurons["c"][u])
        counts = rng.poisson(np.exp(drive) * spec.spike_dt)
        st = np.sort(np.repeat(grid, counts) + rng.random(counts.sum()) * spec.spike_dt)
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
        if layout == "688":
            tr["target_id"] = cond
            tr["target_dir"] = np.degrees(theta_c[cond])
            failed = np.where(rng.random(n) < 0.5, "A", "F")
            tr.create_dataset("result", data=np.where(success, "R", failed).astype(object),
                              dtype=h5py.string_dtype())
            # stored in cm(/s) with conversion 10 -> mm(/s); position also with an offset
            beh = f.create_group(BEHAVIOR.lstrip("/"))
            cp = beh.create_group("Position/cursor_pos")
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
            d = beh.create_dataset("hand_vel/data", data=vel.astype(np.float32))
            d.attrs.update(conversion=1.0, unit="mm/s")
            beh["hand_vel/timestamps"] = bt
            d = beh.create_dataset("hand_pos/data", data=pos.astype(np.float32))
            d.attrs.update(conversion=1.0, unit="mm")
            beh.create_dataset("hand_pos/starting_time", data=0.0).attrs["rate"] = spec.behaviour_hz
    return dict(condition=cond, success=success, onset=ev["onset"], gain=gain, spike_direction=theta_spk,
                partial_units=np.flatnonzero(half))
