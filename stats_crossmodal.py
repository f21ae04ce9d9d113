"""python stats_crossmodal.py [reps.h5] [--out DIR] [--permutations 1000] [--seed 0]
python stats_crossmodal.py runs/demo/reps.h5 --out results/

Cross-modal alignment: for every trial with video, r(mu_x, mu_y) of the same video (paired) against the
trial's mu_x with the mu_y of the animal's other videos (unpaired), for training and held-out animals.
Paired pairs are x of a trial with y of any trial showing the same video (the trial itself and its
repeats, whose y encodes the very same video); trials without a known stimulus pair only with themselves.
Identification: for every trial, the rank of its video's mu_y among the mu_y of every distinct video the
animal saw (all tiers in the file), by the matching loss's distance to the trial's mu_x, with chance.
Definitions of centring, blocks and the permutation test: stats.py. Writes crossmodal.json,
crossmodal.txt and crossmodal.png (default: beside the representations file).
"""

from __future__ import annotations

import numpy as np

import data
import stats

GROUPS = ("train", "heldout")


def analyse(trials: list, path: str, n_perm: int, seed: int) -> dict[str, bytes]:
    """Read the representations, compare, and render {file name: content}."""
    animals = stats.by_animal([t for t in trials if "mu_y" in t.arrays])
    if not animals:
        raise stats.StatsError(f"{path}: no trials with video (mu_y) to compare")
    rng = np.random.default_rng(seed)
    per_animal, comparisons = {}, {g: [] for g in GROUPS}
    for mouse, trials in animals.items():
        c = stats.crossmodal(trials, n_perm, rng)
        group = GROUPS[trials[0].heldout]
        comparisons[group].append(c)
        per_animal[mouse] = (group, c)
    pooled = {g: stats.combine(cs) if cs else None for g, cs in comparisons.items()}
    identification = identify(animals)
    groups = {g: None if c is None else {**stats.result(c), "per_animal": {
        m: stats.result(ca) for m, (ga, ca) in per_animal.items() if ga == g}} for g, c in pooled.items()}
    out = {"file": path, "permutations": n_perm, "seed": seed, "method": stats.METHOD, "groups": groups,
           "identification": identification}

    lines = ["PNBA cross-modal alignment: r(mu_x, mu_y), same video (paired) vs other videos (unpaired)",
             *stats.method_lines(path, n_perm, seed), ""]
    for kind, title in (("centred", "centred (primary)"), ("raw", "raw (uncentred, as published)")):
        rows = []
        for g, entry in groups.items():
            if entry is None:
                continue
            part = entry if kind == "centred" else entry["raw"]
            rows += stats.table_rows(f"{g} animals (pooled)", part)
            for mouse, animal in entry["per_animal"].items():
                rows += stats.table_rows(f"  {mouse}", animal if kind == "centred" else animal["raw"])
        lines += [f"== {title}", stats.table(rows, "group / animal"), ""]
    lines.append("== identification: rank of the true video's mu_y among every distinct video the animal "
                 "saw, by the matching distance to the trial's mu_x")
    lines.append(f"{'trials':<44} {'n_trials':>8} {'videos':>6} {'top-1':>6} {'chance':>7} {'x chance':>8} "
                 f"{'median rank':>11}")
    for name, r in identification.items():
        ratio = r["top1"] / r["chance"] if r["n_trials"] else float("nan")
        lines.append(f"{name:<44} {r['n_trials']:>8} {r['n_candidates']:>6} {stats.fmt(r['top1'], '.3f'):>6} "
                     f"{stats.fmt(r['chance'], '.3f'):>7} {stats.fmt(ratio, '.1f'):>8} "
                     f"{stats.fmt(r['median_rank'], '.1f'):>11}")
    lines += ["", "== verdicts (centred, pooled over the group's animals)"]
    for g, entry in groups.items():
        lines.append(f"no {g} animals with video" if entry is None else stats.verdict(f"{g} animals", entry))
    panels = [[(f"{g} animals, {kind}", pooled[g][kind]["pooled"]) for g in GROUPS if pooled[g] is not None]
              for kind in ("centred", "raw")]
    return {"crossmodal.json": stats.json_bytes(out),
            "crossmodal.txt": ("\n".join(lines) + "\n").encode(),
            "crossmodal.png": stats.histogram_figure(panels, "r(mu_x, mu_y): same video vs other videos")}


def identify(animals: dict[str, list]) -> dict[str, dict]:
    """Identification per trial set: training animals' oracle trials, their trials of every tier never
    trained on, and the held-out animals' trials (zero-shot). Candidates are per animal, so chance is the
    mean of 1 / (videos the animal saw) over the trials."""
    sets = {"training animals, oracle trials": lambda t: not t.heldout and t.tier == "oracle",
            "training animals, trials never trained on": lambda t: not t.heldout and t.tier != "train",
            "held-out animals, all trials (zero-shot)": lambda t: t.heldout}
    out = {}
    for name, chosen in sets.items():
        per_animal = []
        for trials in animals.values():
            known = [t for t in trials if t.stimulus >= 0]
            candidates = {t.stimulus: (t.arrays["mu_y"], t.arrays["logvar_y"]) for t in known}
            per_animal.append(stats.identification([t for t in known if chosen(t)], candidates))
        ranks = [r for a in per_animal for r in a["ranks"]]
        chance = [a["chance"] for a in per_animal for _ in a["ranks"]]
        out[name] = {"top1": float(np.mean(np.array(ranks) == 1)) if ranks else float("nan"),
                     "median_rank": float(np.median(ranks)) if ranks else float("nan"),
                     "chance": float(np.mean(chance)) if chance else float("nan"), "n_trials": len(ranks),
                     "n_candidates": max((a["n_candidates"] for a in per_animal), default=0)}
    return out


def main(argv: list[str] | None = None) -> int:
    return stats.run_cli(__doc__, argv, analyse, data.read_representations, (data.DataError,),
                         epilog="example: python stats_crossmodal.py runs/RUN/reps.h5 --out results/")


if __name__ == "__main__":
    raise SystemExit(main())
