"""python stats_zeroshot.py [reps.h5] [--out DIR] [--permutations 1000] [--seed 0]
python stats_zeroshot.py runs/demo/reps.h5 --out results/

Zero-shot preserved representations: for every pair of animals that share stimuli (pairs of held-out
animals first, flagged), r(mu_x of A, mu_x of B) for trials of the same stimulus (paired) against all other
trial pairs (unpaired); trial-level consistency across repeats within each animal (same statistics); a
two-way ANOVA (pair x paired) when there are several pairs. Trials of unknown stimulus (-1) are left out.
Definitions of centring, blocks and the permutation test: stats.py. Writes zeroshot.json, zeroshot.txt,
zeroshot_blocks.png (distributions per block) and zeroshot_matrix.png (same-vs-different similarity for a
sample of trials of the first pair), by default beside the representations file.
"""

from __future__ import annotations

import itertools

import numpy as np

import data
import stats
from data import TrialRep

MATRIX_TRIALS = 48        # at most this many trials per side in the similarity-matrix figure


def _columns(trials: list[TrialRep]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    return [t.arrays["mu_x"] for t in trials], np.array([t.stimulus for t in trials]), \
        np.array([t.tier for t in trials])


def matrix_figure(a: list[TrialRep], b: list[TrialRep], title: str, rng: np.random.Generator) -> bytes:
    """Raw and centred r between a sample of A's and B's trials of shared stimuli, ordered by stimulus."""
    (xa, la, _), (xb, lb, _) = _columns(a), _columns(b)
    chosen, n_a, n_b = [], 0, 0
    for s in rng.permutation(np.intersect1d(la, lb)):
        if chosen and (n_a + (la == s).sum() > MATRIX_TRIALS or n_b + (lb == s).sum() > MATRIX_TRIALS):
            continue
        chosen.append(s)
        n_a, n_b = n_a + (la == s).sum(), n_b + (lb == s).sum()
    rows = np.flatnonzero(np.isin(la, chosen))
    rows = rows[np.argsort(la[rows], kind="stable")][:MATRIX_TRIALS]      # the cut only bites if the first
    cols = np.flatnonzero(np.isin(lb, chosen))                              # stimulus alone is over budget
    cols = cols[np.argsort(lb[cols], kind="stable")][:MATRIX_TRIALS]
    ca, cb = stats.centre(xa), stats.centre(xb)
    panels = [(f"raw r ({len(chosen)} shared stimuli)", stats.correlation_matrix([xa[i] for i in rows],
                                                                                 [xb[j] for j in cols])),
              ("centred r (primary)", stats.correlation_matrix([ca[i] for i in rows], [cb[j] for j in cols]))]
    return stats.matrix_figure(panels, la[rows], lb[cols], title)


def analyse(trials: list, path: str, n_perm: int, seed: int) -> dict[str, bytes]:
    """Read the representations, compare, and render {file name: content}."""
    animals = stats.by_animal([t for t in trials if t.stimulus >= 0])
    stimuli = {m: {t.stimulus for t in ts} for m, ts in animals.items()}
    heldout = {m: ts[0].heldout for m, ts in animals.items()}
    # pairs of held-out animals first, then pairs with one held-out animal, then the rest
    pairs = sorted(((a, b) for a, b in itertools.combinations(sorted(animals), 2) if stimuli[a] & stimuli[b]),
                   key=lambda p: (-heldout[p[0]] - heldout[p[1]], p))
    if not pairs:
        raise stats.StatsError(f"{path}: no two animals share a stimulus")
    rng = np.random.default_rng(seed)

    entries, centred = [], []         # centred comparisons are kept for the ANOVA and the figures
    for a, b in pairs:
        (xa, la, ta), (xb, lb, tb) = _columns(animals[a]), _columns(animals[b])
        c = stats.between(xa, xb, la, lb, ta, tb, n_perm, rng)
        entries.append({"a": a, "b": b, "heldout": heldout[a] and heldout[b], **stats.result(c)})
        centred.append(c["centred"])
    repeats, repeat_comparisons = {}, []
    for mouse, trials in animals.items():
        x, labels, tiers = _columns(trials)
        if len(np.unique(labels)) == len(labels):
            continue
        c = stats.within(x, labels, tiers, n_perm, rng)
        repeats[mouse] = {"heldout": heldout[mouse], **stats.result(c)}
        repeat_comparisons.append(c["centred"])
    anova = None
    if len(pairs) > 1:
        anova = stats.two_way_anova([[c["pooled"].paired, c["pooled"].unpaired] for c in centred],
                                    ("pair", "paired"))
    out = {"file": path, "permutations": n_perm, "seed": seed, "method": stats.METHOD,
           "pairs": entries, "repeats": repeats, "anova": anova}

    names = [f"{e['a']} x {e['b']}" + (" (held-out)" if e["heldout"] else "") for e in entries]
    lines = ["PNBA zero-shot preserved representations: r(mu_x A, mu_x B), same stimulus vs other pairs",
             *stats.method_lines(path, n_perm, seed), ""]
    for kind, title in (("centred", "centred (primary)"), ("raw", "raw (uncentred, as published)")):
        pair_rows = [row for name, e in zip(names, entries, strict=True)
                     for row in stats.table_rows(name, e if kind == "centred" else e["raw"])]
        repeat_rows = [row for m, e in repeats.items()
                       for row in stats.table_rows(m, e if kind == "centred" else e["raw"])]
        lines += [f"== animal pairs, {title}", stats.table(pair_rows, "pair"), "",
                  f"== repeats within an animal, {title}",
                  stats.table(repeat_rows, "animal") if repeats else "no animal shows a stimulus twice", ""]
    lines.append("== two-way ANOVA (centred, pooled r ~ pair * paired)")
    if anova is None:
        lines.append("skipped: one animal pair only (the pair factor needs two levels)")
    else:
        lines += [f"{k:<14} df {v['df']:>3}  F {stats.fmt(v['F'], '10.3f')}  p {stats.fmt(v['p'], '.3g')}"
                  for k, v in anova["effects"].items()]
        lines.append(f"residual df {anova['residual']['df']}; {anova['note']}")
    lines += ["", "== verdicts (centred, pooled; permutation p)"]
    lines += [stats.verdict(name, e) for name, e in zip(names, entries, strict=True)]
    lines += [stats.verdict(f"repeats in {m}", e) for m, e in repeats.items()]

    rows = [("held-out pairs", [c for c, e in zip(centred, entries, strict=True) if e["heldout"]]),
            ("other pairs", [c for c, e in zip(centred, entries, strict=True) if not e["heldout"]]),
            ("repeats within animals", repeat_comparisons)]
    panels = [[(f"{name}, {block} (centred)", stats.pool(cs)[block]) for block in ("pooled", *stats.BLOCKS)]
              for name, cs in rows if cs]
    a, b = pairs[0]
    return {"zeroshot.json": stats.json_bytes(out),
            "zeroshot.txt": ("\n".join(lines) + "\n").encode(),
            "zeroshot_blocks.png": stats.histogram_figure(panels, "same stimulus (paired) vs other pairs"),
            "zeroshot_matrix.png": matrix_figure(animals[a], animals[b], f"{names[0]}, trials by stimulus",
                                                 np.random.default_rng(seed))}


def main(argv: list[str] | None = None) -> int:
    return stats.run_cli(__doc__, argv, analyse, data.read_representations, (data.DataError,))


if __name__ == "__main__":
    raise SystemExit(main())
