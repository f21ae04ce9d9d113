"""Extract per-trial representations (Gaussian means and log-variances) from a trained PNBA.

    python extract.py --ckpt runs/RUN/last.pt                       # the run's own data -> runs/RUN/reps.h5
    python extract.py --ckpt runs/RUN/last.pt --data /data/new_mice --out new.h5   # zero-shot, new animals
    python extract.py --ckpt runs/RUN/last.pt --tiers train,oracle --device cuda
    python extract.py --ckpt runs/RUN/last.pt --data.height 16     # config keys: how the data are read
    python extract.py --ckpt runs/monkey/last.pt --data /data/000688/sub-M   # NWB: monkeys never trained on

The config is the checkpoint's; the keys that say how data are read and where the model runs can be
overridden (EXTRACT_KEYS); the others are fixed by the weights. The output folder is checked writable
before the work starts.

Every trial that has responses (train, oracle and test tiers whose responses are real; hidden test
tiers are skipped) is encoded with means, no sampling, in consecutive windows of the training length.
Output: HDF5 /<animal>/<tier>/<trial>/{mu_x, logvar_x, mu_y, logvar_y, mu_p} (float32,
(frames, latent)) with attributes stimulus (pixel-pairing group id, or the condition id of NWB trials),
condition, valid_frames, and per animal heldout (True for every animal the model did not train on),
subject and session; the file attribute modality ("video" | "behaviour"). NWB monkeys (one animal per
session) also get behaviour (frames, D), the trial's velocity in the model's own space (velocity / the
session's RMS speed; recordings/reps.py), with per animal behaviour_space, behaviour_scale (x it = the
file's values) and behaviour_unit (what the file states). Written to a temp file, then renamed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

import config
import data
import evaluate
import pnba

# the keys that apply to extraction: which data, read how, and the device; the weights fix the rest
EXTRACT_KEYS = ("data.paths", "data.std_floor", "data.height", "data.width", "data.area", "run.device")


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def trial_rep(m, i: int, arrays: dict, groups: dict, heldout: bool) -> data.TrialRep:
    """What reps.h5 holds of trial i of animal m: its arrays, plus the behaviour in the model's own space for
    NWB monkeys (one unit for every animal)."""
    condition, space = "", {}
    if m.stimulus_kind == "behaviour":
        arrays["behaviour"], condition = m.normalised_behaviour(i), m.condition(i)
        space = dict(behaviour_space=m.behaviour_space, behaviour_scale=m.behaviour_scale,
                     behaviour_unit=m.behaviour_unit)
    return data.TrialRep(m.name, str(m.tiers[i]), i, groups.get((m.name, i), -1), m.valid_frames(i), heldout,
                         arrays, m.subject, m.session, condition, **space)


def extract(ckpt_path: str, data_paths=None, out_path=None, tiers=None, device="auto", overrides=()) -> str:
    """overrides: `--section.field value` arguments, of EXTRACT_KEYS only."""
    ckpt = pnba.load_checkpoint(ckpt_path)
    try:
        cfg = config.validate(config.from_dict(ckpt["config"]))
    except config.ConfigError as e:
        raise pnba.CheckpointError(f"{ckpt_path}: its config does not hold: {e}") from None
    cfg.run.device = device                     # the training machine's device says nothing about this one
    cfg, unknown = config.parse_overrides(cfg, list(overrides), allowed=EXTRACT_KEYS)
    if unknown:
        raise config.ConfigError(f"unknown arguments {' '.join(unknown)}")
    cfg.data.paths = tuple(data_paths or cfg.data.paths)
    config.validate(cfg)
    dev = config.pick_device(cfg.run.device)
    out_path = out_path or str(Path(ckpt_path).with_name("reps.h5"))
    config.check_writable(os.path.dirname(os.path.abspath(out_path)))
    paths = list(cfg.data.paths)
    if not paths:
        raise data.DataError(f"{ckpt_path}: the checkpoint names no data folders; pass --data")
    mice = data.mice_from_config(cfg.data)
    data.check_stimulus(mice, cfg.model.stimulus)
    data.check_state(mice, cfg.model.state_input)
    pnba.check_mice(ckpt, {m.name: m.n_neurons for m in mice}, source=ckpt_path)
    model = pnba.PNBA(cfg.model, ckpt["neuron_counts"])
    pnba.load_weights(model, ckpt, ckpt_path)
    model.to(dev).eval()

    groups = data.stimulus_groups(mice)
    jobs = []
    for m in mice:
        trials = [int(i) for i in m.trials(tiers, hidden=False)]
        if tiers:
            for t in tiers:
                if not any(m.tiers[i] == t for i in trials):
                    raise data.DataError(f"{m.path}: tier {t!r} has no trials with responses")
        jobs += [(m, i) for i in trials]
    if not jobs:
        raise data.DataError(f"{', '.join(paths)}: no trials with responses to extract")

    reps, cache = [], {}
    t0 = time.time()
    bar = tqdm(total=len(jobs), desc="extract", unit="trial", dynamic_ncols=True)
    for m in mice:
        trials = [i for a, i in jobs if a is m]
        if not trials:
            continue
        x_stats = evaluate.animal_statistics(model, m, cfg.data.frames, dev)
        # a training animal's identity-free encoding too (models with unit embeddings): what a new animal gets
        free_stats = evaluate.animal_statistics(model, m, cfg.data.frames, dev, identity=False) \
            if model.identity(m.name) is not None else None
        heldout = m.name not in ckpt["neuron_counts"]
        for e in evaluate.encode_trials(model, m, trials, cfg.data.frames, dev, x_stats, free_stats,
                                        evaluate.stimulus_key(m, groups), cache):
            reps.append(trial_rep(m, e.trial, e.arrays(), groups, heldout))
            bar.update()
    bar.close()
    rate = len(jobs) / (time.time() - t0)
    data.write_representations(out_path, reps, {
        "checkpoint": str(Path(ckpt_path).resolve()),
        "checkpoint_sha256": file_digest(ckpt_path),
        "step": int(ckpt.get("step", 0)),
        "config": json.dumps(config.to_dict(cfg)),        # the checkpoint's, with the overrides applied
        "modality": mice[0].stimulus_kind,                # the stimulus: "video" or "behaviour"
    })
    print(f"wrote {out_path}: {len(reps)} trials of {len(mice)} animals ({rate:.1f} trials/s)")
    return out_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="config overrides that apply (the weights fix the rest):\n  "
               + " ".join(f"--{k}" for k in EXTRACT_KEYS) + "\n"
               "example: python extract.py --ckpt runs/RUN/last.pt\n"
               "example: python extract.py --ckpt runs/RUN/last.pt --data /data/new_mice --out new.h5",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (e.g. runs/RUN/last.pt)")
    p.add_argument("--data", nargs="+", default=None,
                   help="Sensorium mouse folders or a folder holding them, or .nwb files or folders holding "
                        "them; animals the model never trained on are encoded zero-shot (default: the "
                        "checkpoint's own data)")
    p.add_argument("--out", default=None, help="output HDF5 (default: reps.h5 beside the checkpoint)")
    p.add_argument("--tiers", default=None,
                   help="comma-separated tiers: train, oracle, or Sensorium test tiers with real responses "
                        f"({', '.join(data.TEST_TIERS)}) (default: every tier with responses)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:<i> (same as --run.device)")
    args, rest = p.parse_known_args(argv)
    tiers = [t for t in args.tiers.split(",") if t] if args.tiers else None
    try:
        extract(args.ckpt, args.data, args.out, tiers, args.device, rest)
    except (data.DataError, pnba.CheckpointError, config.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
