"""python data.py synth OUT [--preset tiny|demo|demo2|monkey|monkey2] [--seed S]
python data.py check DIR_OR_FILE [...] [--json]

The data layer as the scripts see it: one interface over both kinds of recording, whose parts live in
recordings/ (one job per module):

    recordings/animal.py         the recording interface (Animal, BehaviourAnimal): all that scripts call
    recordings/sensorium.py      Sensorium 2023 mouse folders (Mouse): reading and normalising
    recordings/nwb.py            NWB monkey motor cortex (Session, Monkey): spikes, kinematics, trials
    recordings/pairing.py        the same video across mice and within a mouse, from pixels
    recordings/windows.py        run-start checks, training batches, whole-trial evaluation windows
    recordings/synthetic.py      synthetic Sensorium folders
    recordings/synthetic_nwb.py  synthetic NWB files
    recordings/reps.py           the representations file (extract.py writes it, the stats scripts read it)

    animals = mice_from_config(cfg.data)                  # Mouse or Monkey objects: recordings.animal.Animal
    stimulus, responses = animals[0].normalised(i)         # video (T, H, W) or kinematics (T, D); (T, N)
    loader = make_train_loader(animals, frames, batch_size, workers, seed=42, epoch=0)
    groups = stimulus_groups(animals)                        # (animal, trial) -> stimulus / condition id
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections import defaultdict

import numpy as np

from recordings import nwb, synthetic_nwb
from recordings.animal import Animal, BehaviourAnimal
from recordings.common import TRUTH_DIR, DataError, open_hdf5
from recordings.pairing import pairs, repeats, stimulus_groups
from recordings.reps import (
    REPS_ARRAYS,
    REPS_DATA_ARRAYS,
    TrialRep,
    read_attributes,
    read_representations,
    write_representations,
)
from recordings.sensorium import TEST_TIERS, Mouse, find_mice, open_mice, response_precision
from recordings.synthetic import SYNTH_PRESETS, read_synthetic_truth, write_synthetic
from recordings.windows import (
    check_run_data,
    check_state,
    eval_windows,
    make_train_loader,
    train_batches_per_epoch,
)

__all__ = ["Animal", "BehaviourAnimal", "TRUTH_DIR", "DataError", "open_hdf5", "pairs", "repeats",
           "stimulus_groups", "REPS_ARRAYS", "REPS_DATA_ARRAYS", "TrialRep", "read_attributes",
           "read_representations", "write_representations", "TEST_TIERS",
           "Mouse", "find_mice", "open_mice", "response_precision", "SYNTH_PRESETS", "read_synthetic_truth",
           "write_synthetic", "check_run_data", "check_state", "eval_windows", "make_train_loader",
           "train_batches_per_epoch", "mice_from_config", "check_stimulus", "write_synthetic_dataset",
           "main"]


def mice_from_config(data_cfg, paths=None) -> list[Animal]:
    """The animals of `paths` (default: data_cfg.paths) opened as a run's config.DataConfig says: Sensorium
    mice (response floor, video size), or, when the paths name .nwb files or folders holding them, one
    nwb.Monkey per session (bin width, trial window, area). Every script opens its data here, so that what
    the model was trained on and what it is evaluated on cannot drift apart."""
    paths = list(paths or data_cfg.paths)
    if nwb.is_nwb_input(paths):
        return nwb.open_monkeys(paths, data_cfg.bin_ms, data_cfg.window_ms, data_cfg.area or None)
    return open_mice(paths, data_cfg.std_floor, data_cfg.height, data_cfg.width)



def describe(mice: list[Mouse], groups: dict[tuple[str, int], int]) -> dict:
    """What `check --json` prints: per mouse neurons, slots per tier (with "none"), valid-frame lengths
    {length: trials}, hidden tiers; same-video trial pairs between mice and repeat groups within each."""
    mice = sorted(mice, key=lambda m: m.name)
    out = {"mice": {}, "pairs": [], "repeats": {}}
    for m in mice:
        tiers, counts = np.unique(m.tiers, return_counts=True)
        lengths = defaultdict(int)
        for i in m.trials():
            lengths[m.valid_frames(i)] += 1
        out["mice"][m.name] = {"neurons": m.n_neurons,
                               "tiers": dict(zip(tiers.tolist(), counts.tolist(), strict=True)),
                               "valid_frames": {str(t): n for t, n in sorted(lengths.items())},
                               "hidden_tiers": m.hidden_tiers}
        out["repeats"][m.name] = repeats(groups, m)
    for a, b in itertools.combinations(mice, 2):
        trials = pairs(groups, a, b)
        if trials:
            out["pairs"].append({"a": a.name, "b": b.name, "trials": [list(p) for p in trials]})
    return out


def _tier_family(tier: str) -> str:
    """live_test_main, final_test_main -> test_main: the split is the competition's, not the stimulus's."""
    return tier.removeprefix("live_").removeprefix("final_")


def _print_report(mice: list[Mouse], report: dict) -> None:
    tiers_of = {m.name: m.tiers for m in mice}
    for name, info in report["mice"].items():
        print(f"{name}: {info['neurons']} neurons, hidden tiers: {', '.join(info['hidden_tiers']) or '-'}")
        print("  slots per tier: " + ", ".join(f"{t} {n}" for t, n in info["tiers"].items()))
        print("  valid frames:   " + ", ".join(f"{t} x{n}" for t, n in info["valid_frames"].items()))
        for group in report["repeats"][name]:
            tiers = "/".join(sorted(set(tiers_of[name][group].tolist())))
            print(f"  same video x{len(group)} ({tiers}): {' '.join(map(str, group))}")
    for p in report["pairs"]:
        kinds = defaultdict(int)
        for i, j in p["trials"]:
            kinds["-".join(_tier_family(tiers_of[m][t]) for m, t in ((p["a"], i), (p["b"], j)))] += 1
        detail = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        print(f"same video in {p['a']} and {p['b']}: {len(p['trials'])} trial pairs ({detail})")
    if not report["pairs"] and len(mice) > 1:
        print("no video is shared between these mice")


def check_stimulus(animals: list, stimulus: str) -> None:
    """DataError unless every animal's stimulus is the kind the model reads (config model.stimulus): a video
    model given NWB sessions, or the reverse, would otherwise fail at its first step on a shape."""
    for a in animals:
        if a.stimulus_kind != stimulus:
            hint = "--preset monkey" if a.stimulus_kind == "behaviour" else "a video preset (demo, paper)"
            raise DataError(f"{a.path}: its stimulus is {a.stimulus_kind}, but the model reads {stimulus} "
                            f"(model.stimulus); use {hint} or --model.stimulus {a.stimulus_kind}")


def write_synthetic_dataset(root: str, preset: str, seed: int = 0) -> list[str]:
    """A synthetic dataset of any preset: Sensorium mouse folders (SYNTH_PRESETS) or NWB monkeys
    (synthetic_nwb.NWB_SYNTH_PRESETS). Returns what was written (ground truth in root/TRUTH_DIR)."""
    if preset in synthetic_nwb.NWB_SYNTH_PRESETS:
        return synthetic_nwb.write_synthetic_nwb(root, preset, seed)
    return write_synthetic(root, preset, seed)


def main(argv: list[str] | None = None) -> int:
    synth_example = "example: python data.py synth data_synth/demo --preset demo"
    check_example = "example: python data.py check /data/sensorium"
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="data.py", description="Sensorium 2023 and NWB monkey data: synthetic "
                                "writer, checker.", epilog=f"{synth_example}\n{check_example}",
                                formatter_class=raw)
    sub = p.add_subparsers(dest="command", required=True)
    synth_help = "write a synthetic dataset: Sensorium mouse folders, or NWB files (monkey presets)"
    s = sub.add_parser("synth", help=synth_help, description=synth_help, epilog=synth_example,
                       formatter_class=raw)
    s.add_argument("out", help="new (or empty) folder to write")
    s.add_argument("--preset", default="demo", choices=[*SYNTH_PRESETS, *synthetic_nwb.NWB_SYNTH_PRESETS],
                   help=f"Sensorium: {' | '.join(SYNTH_PRESETS)}; NWB: "
                        f"{' | '.join(synthetic_nwb.NWB_SYNTH_PRESETS)} (default: demo)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    check_help = ("describe Sensorium mouse folders and the videos they share, or NWB files (subjects, "
                  "sessions, trials)")
    c = sub.add_parser("check", help=check_help, description=check_help,
                       epilog=f"{check_example}\nexample: python data.py check data_synth/monkey --json",
                       formatter_class=raw)
    c.add_argument("dirs", nargs="+", metavar="DIR_OR_FILE",
                   help="Sensorium mouse folders or a folder holding them, or .nwb files or folders holding "
                        "them (not both kinds at once)")
    c.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = p.parse_args(argv)
    try:
        if args.command == "synth":
            for path in write_synthetic_dataset(args.out, args.preset, args.seed):
                print(path)
            print(os.path.join(args.out, TRUTH_DIR))
        elif nwb.is_nwb_input(args.dirs):
            report = nwb.describe([nwb.open_session(f) for f in nwb.find_nwb(args.dirs)])
            if args.json:
                print(json.dumps(report))
            else:
                nwb.print_report(report)
        else:
            mice = open_mice(args.dirs)
            report = describe(mice, stimulus_groups(mice))
            if args.json:
                print(json.dumps(report))
            else:
                _print_report(mice, report)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
