"""python stats_crossmodal.py [reps.h5] [--out DIR] [--permutations 1000] [--seed 0]
python stats_crossmodal.py runs/demo/reps.h5 --out results/

Cross-modal alignment: for every trial with video, r(mu_x, mu_y) of the same video (paired) against the
trial's mu_x with the mu_y of the animal's other videos (unpaired), for training and held-out animals.
Paired pairs are x of a trial with y of any trial showing the same video (the trial itself and its
repeats, whose y encodes the very same video); trials without a known stimulus pair only with themselves.
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
        # an unknown stimulus gets a label of its own, so that trial pairs only with itself
        labels = [t.stimulus if t.stimulus >= 0 else -1 - i for i, t in enumerate(trials)]
        tiers = [t.tier for t in trials]
        c = stats.between([t.arrays["mu_x"] for t in trials], [t.arrays["mu_y"] for t in trials],
                          labels, labels, tiers, tiers, n_perm, rng)
        group = GROUPS[trials[0].heldout]
        comparisons[group].append(c)
        per_animal[mouse] = (group, c)
    pooled = {g: stats.combine(cs) if cs else None for g, cs in comparisons.items()}
    groups = {g: None if c is None else {**stats.result(c), "per_animal": {
        m: stats.result(ca) for m, (ga, ca) in per_animal.items() if ga == g}} for g, c in pooled.items()}
    out = {"file": path, "permutations": n_perm, "seed": seed, "method": stats.METHOD, "groups": groups}

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
    lines.append("== verdicts (centred, pooled over the group's animals)")
    for g, entry in groups.items():
        lines.append(f"no {g} animals with video" if entry is None else stats.verdict(f"{g} animals", entry))
    panels = [[(f"{g} animals, {kind}", pooled[g][kind]["pooled"]) for g in GROUPS if pooled[g] is not None]
              for kind in ("centred", "raw")]
    return {"crossmodal.json": stats.json_bytes(out),
            "crossmodal.txt": ("\n".join(lines) + "\n").encode(),
            "crossmodal.png": stats.histogram_figure(panels, "r(mu_x, mu_y): same video vs other videos")}


def main(argv: list[str] | None = None) -> int:
    return stats.run_cli(__doc__, argv, analyse, data.read_representations, (data.DataError,))


if __name__ == "__main__":
    raise SystemExit(main())
