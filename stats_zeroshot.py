"""python stats_zeroshot.py [reps.h5] [--control SUBJECT,...] [--out DIR] [--permutations 1000] [--seed 0]
python stats_zeroshot.py runs/demo/reps.h5 --out results/
python stats_zeroshot.py runs/monkey/reps.h5 --control T

Zero-shot preserved representations, from the representations file alone: for every pair of animals that
share stimuli (pairs of held-out animals first, flagged), r(mu_x of A, mu_x of B) for trials of the same
stimulus (paired) against all other trial pairs (unpaired); trial-level consistency across repeats within
each animal (same statistics); a two-way ANOVA (pair x paired) when there are several pairs. Trials of
unknown stimulus (-1) are left out. Definitions of centring, blocks and the permutation test: stats.py.
Writes zeroshot.json, zeroshot.txt, zeroshot_blocks.png (distributions per block) and zeroshot_matrix.png
(same-vs-different similarity for a sample of trials of the first pair), by default beside the
representations file. What needs the recordings themselves (the model-free baselines beside PNBA, the
rates ridge on spike counts) is its own stage: stats_baselines.py.

Recordings with behaviour (monkey reaching: the trials carry "behaviour", the true hand velocity per frame,
and the stimulus is the reach condition) add three sections; a file without them (Sensorium) gets none.
--control names negative-control subjects (default none; the file does not say which they are); held-out
animals are those the representations file marks held out (never trained on).
- Condition ceiling (every trial carries "behaviour"): every pair and every animal's repeats also scored on
  the behaviour instead of mu_x, same statistics; "ceiling" (its result) and "fraction_of_ceiling" (PNBA's
  centred d / ceiling d) in each entry of "pairs" and "repeats", and a table in zeroshot.txt.
- Consistency hierarchy (some subject has more than one session, i.e. animal key): trial level (pairs of
  trials within a session: the repeats), session level (pairs of sessions of one subject) and subject
  level (sessions of different subjects), each same condition vs different, pooled per group: heldout
  (held-out non-control subjects only, zero-shot: the headline), train, train x heldout, control (any pair
  with a control subject); with behaviour, the ceiling per cell. "hierarchy" in zeroshot.json, a table
  (also printed) and zeroshot_hierarchy.png (rows: groups, columns: levels).
- Behaviour decoding (every trial carries "behaviour", and there are training and held-out non-control
  animals; decoding.py): linear ridge, MLP and GRU from mu_x per frame to the behaviour, fitted on the
  training animals and scored (R²) on held-out ones with no refit; beside it the within-animal bound (k-fold
  inside each held-out animal) and the same zero-shot fit from mu_y (cross-modal reference). "decoding" in
  zeroshot.json, a table (also printed) in zeroshot.txt.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys

import numpy as np

import data
import decoding
import stats
from data import TrialRep

MATRIX_TRIALS = 48        # at most this many trials per side in the similarity-matrix figure


def _columns(trials: list[TrialRep], array: str = "mu_x") -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    return [t.arrays[array] for t in trials], np.array([t.stimulus for t in trials]), \
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


def analysed_animals(trials: list[TrialRep]) -> dict[str, list[TrialRep]]:
    """The trials of a known stimulus (>= 0), by animal, in file order."""
    return stats.by_animal([t for t in trials if t.stimulus >= 0])


def animal_pairs(animals: dict[str, list[TrialRep]], path: str) -> list[tuple[str, str]]:
    """Every pair of animals that share a stimulus: pairs of held-out animals first, then pairs with one
    held-out animal, then the rest; StatsError (naming path) if there is none."""
    stimuli = {m: {t.stimulus for t in ts} for m, ts in animals.items()}
    heldout = {m: ts[0].heldout for m, ts in animals.items()}
    pairs = sorted(((a, b) for a, b in itertools.combinations(sorted(animals), 2) if stimuli[a] & stimuli[b]),
                   key=lambda p: (-heldout[p[0]] - heldout[p[1]], p))
    if not pairs:
        raise stats.StatsError(f"{path}: no two animals share a stimulus")
    return pairs


def pair_statistics(animals: dict[str, list[TrialRep]], pairs: list[tuple[str, str]], n_perm: int,
                    rng: np.random.Generator) -> tuple[list[dict], dict[tuple[str, str], dict]]:
    """PNBA's zero-shot statistics per pair, r(mu_x of A, mu_x of B) same stimulus vs other (stats.pair), in
    the order of pairs: ([{a, b, heldout (both held out), **stats.result}], {(a, b): stats.pair result})."""
    entries, comparisons = [], {}
    for a, b in pairs:
        comparisons[a, b] = stats.pair(animals[a], animals[b], n_perm, rng)
        entries.append({"a": a, "b": b, "heldout": animals[a][0].heldout and animals[b][0].heldout,
                        **stats.result(comparisons[a, b])})
    return entries, comparisons


def repeat_statistics(animals: dict[str, list[TrialRep]], n_perm: int,
                      rng: np.random.Generator) -> tuple[dict[str, dict], dict[str, dict]]:
    """The same statistics between the trials of one animal (repeats of a stimulus), for every animal shown
    some stimulus twice: ({animal: {heldout, **stats.result}}, {animal: stats.within result})."""
    repeats, comparisons = {}, {}
    for mouse, trials in animals.items():
        x, labels, tiers = _columns(trials)
        if len(np.unique(labels)) == len(labels):
            continue
        comparisons[mouse] = stats.within(x, labels, tiers, n_perm, rng)
        repeats[mouse] = {"heldout": trials[0].heldout, **stats.result(comparisons[mouse])}
    return repeats, comparisons


def pair_names(entries: list[dict]) -> list[str]:
    """"A x B", flagged " (held-out)" for pairs of held-out animals, per pair_statistics entry."""
    return [f"{e['a']} x {e['b']}" + (" (held-out)" if e["heldout"] else "") for e in entries]


def pair_anova(comparisons: dict[tuple[str, str], dict]) -> dict | None:
    """Two-way ANOVA of the centred pooled r ~ pair * paired; None for one pair (one level of the factor)."""
    if len(comparisons) < 2:
        return None
    return stats.two_way_anova([[c["centred"]["pooled"].paired, c["centred"]["pooled"].unpaired]
                                for c in comparisons.values()], ("pair", "paired"))


def analyse(trials: list[TrialRep], path: str, n_perm: int, seed: int, controls=()) -> dict[str, bytes]:
    """The zero-shot analysis of a representations file's trials -> {file name: content}; controls: the
    negative-control subjects (--control)."""
    animals = analysed_animals(trials)
    pairs = animal_pairs(animals, path)
    role = roles(animals, controls, path)
    rng = np.random.default_rng(seed)
    entries, comparisons = pair_statistics(animals, pairs, n_perm, rng)
    repeats, repeat_comparisons = repeat_statistics(animals, n_perm, rng)
    behaviour = has_behaviour(animals)
    ceiling = condition_ceiling(animals, pairs, list(repeats), n_perm, seed) if behaviour else None
    if behaviour:
        for e in entries:
            add_ceiling(e, ceiling[0][e["a"], e["b"]])
        for mouse, e in repeats.items():
            add_ceiling(e, ceiling[1][mouse])
    out = {"file": path, "permutations": n_perm, "seed": seed, "method": stats.METHOD,
           "pairs": entries, "repeats": repeats, "anova": pair_anova(comparisons)}
    names = pair_names(entries)
    lines = pnba_lines(path, n_perm, seed, names, entries, repeats, out["anova"])
    a, b = pairs[0]
    files = {"zeroshot_blocks.png": blocks_figure(entries, comparisons, repeat_comparisons),
             "zeroshot_matrix.png": matrix_figure(animals[a], animals[b], f"{names[0]}, trials by stimulus",
                                                  np.random.default_rng(seed))}
    if behaviour:
        lines += ["", *ceiling_lines(names, entries, repeats)]
    subject = subjects(animals)
    if len(set(subject.values())) < len(subject):       # a subject with several sessions: a session level
        out["hierarchy"], summary, files["zeroshot_hierarchy.png"] = hierarchy_section(
            subject, role, repeat_comparisons, comparisons, ceiling)
        lines += ["", *summary]
        print("\n".join(summary))
    if behaviour:
        out["decoding"], summary = decoding_section(animals, role, seed)
        lines += ["", *summary]
        print("\n".join(summary))
    text = ("\n".join(lines) + "\n").encode()
    return {"zeroshot.json": stats.json_bytes(out), "zeroshot.txt": text, **files}


def pnba_lines(path: str, n_perm: int, seed: int, names: list[str], entries: list[dict], repeats: dict,
               anova: dict | None) -> list[str]:
    """The text of the pairs, the repeats and the ANOVA: tables (centred, then raw) and verdicts."""
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
    return lines + [stats.verdict(f"repeats in {m}", e) for m, e in repeats.items()]


def blocks_figure(entries: list[dict], comparisons: dict[tuple[str, str], dict],
                  repeat_comparisons: dict[str, dict]) -> bytes:
    """Centred paired vs unpaired r per block: held-out pairs, other pairs, repeats within animals."""
    centred = [c["centred"] for c in comparisons.values()]
    rows = [("held-out pairs", [c for c, e in zip(centred, entries, strict=True) if e["heldout"]]),
            ("other pairs", [c for c, e in zip(centred, entries, strict=True) if not e["heldout"]]),
            ("repeats within animals", [c["centred"] for c in repeat_comparisons.values()])]
    panels = [[(f"{name}, {block} (centred)", stats.pool(cs)[block]) for block in ("pooled", *stats.BLOCKS)]
              for name, cs in rows if cs]
    return stats.histogram_figure(panels, "same stimulus (paired) vs other pairs")


# ---------------------------------------------------------------------------------------------
# Recordings with behaviour and subject labels (monkey reaching): ceiling, hierarchy, decoding
# ---------------------------------------------------------------------------------------------

def has_behaviour(animals: dict[str, list[TrialRep]]) -> bool:
    """Every trial carries "behaviour" (reaching recordings): the ceiling and decoding sections apply."""
    return all("behaviour" in t.arrays for ts in animals.values() for t in ts)


def subjects(animals: dict[str, list[TrialRep]]) -> dict[str, str]:
    """{animal: its subject}; an animal without a subject label is its own subject."""
    return {m: ts[0].subject or m for m, ts in animals.items()}


def roles(animals: dict[str, list[TrialRep]], controls, path: str) -> dict[str, str]:
    """{animal: "control" (its subject is one of controls), "heldout" (TrialRep.heldout) or "train"};
    StatsError for a control subject that is not in the file."""
    subject = subjects(animals)
    unknown = sorted(set(controls) - set(subject.values()))
    if unknown:
        raise stats.StatsError(f"{path}: --control {','.join(unknown)}: no such subject (subjects: "
                               f"{','.join(sorted(set(subject.values())))})")
    return {m: "control" if subject[m] in controls else "heldout" if ts[0].heldout else "train"
            for m, ts in animals.items()}


def condition_ceiling(animals: dict[str, list[TrialRep]], pairs: list[tuple[str, str]],
                      repeat_animals: list[str], n_perm: int, seed: int) -> tuple[dict, dict]:
    """The PNBA statistics on the true behaviour instead of mu_x: how far same-condition trials resemble
    each other in the kinematics themselves. Returns ({(a, b): between()}, {animal: within()})."""
    rng = np.random.default_rng([seed, 1])       # its own stream: PNBA's permutations stay as without it
    between = {(a, b): stats.pair(animals[a], animals[b], n_perm, rng, "behaviour") for a, b in pairs}
    within = {m: stats.within(*_columns(animals[m], "behaviour"), n_perm, rng) for m in repeat_animals}
    return between, within


def add_ceiling(entry: dict, ceiling: dict) -> None:
    """Put the ceiling's result() and PNBA's d as a fraction of the ceiling's into a result() entry."""
    entry["ceiling"] = stats.result(ceiling)
    entry["fraction_of_ceiling"] = stats.ratio(entry["cohens_d"], entry["ceiling"]["cohens_d"])


def ceiling_lines(names: list[str], entries: list[dict], repeats: dict[str, dict]) -> list[str]:
    """Text table: PNBA's centred pooled statistics beside the same on the behaviour, per pair and animal."""
    rows = [*zip(names, entries, strict=True), *((f"repeats in {m}", e) for m, e in repeats.items())]
    width = max(len(name) for name, _ in [*rows, ("pair", None)])
    head = (f"{'pair':<{width}} {'paired_r':>8} {'unpaired_r':>10} {'d':>7} {'perm_p':>8} "
            f"{'ceil_paired':>11} {'ceil_unpaired':>13} {'ceiling_d':>9} {'ceil_p':>8} {'fraction':>8}")
    lines = ["== condition ceiling: the same statistics on the true behaviour (centred, pooled over blocks); "
             "fraction = d / ceiling d", head, "-" * len(head)]
    for name, e in rows:
        c = e["ceiling"]
        lines.append(f"{name:<{width}} {stats.fmt(e['paired_mean'], '.3f'):>8} "
                     f"{stats.fmt(e['unpaired_mean'], '.3f'):>10} {stats.fmt(e['cohens_d'], '.2f'):>7} "
                     f"{stats.fmt(e['perm_p'], '.3g'):>8} {stats.fmt(c['paired_mean'], '.3f'):>11} "
                     f"{stats.fmt(c['unpaired_mean'], '.3f'):>13} {stats.fmt(c['cohens_d'], '.2f'):>9} "
                     f"{stats.fmt(c['perm_p'], '.3g'):>8} {stats.fmt(e['fraction_of_ceiling'], '.2f'):>8}")
    return lines


HIERARCHY_NOTE = ("each cell pools its animals or pairs (stats.pool); pairs sharing a session are relabelled "
                  "independently, so the pooled permutation null is approximate there; n_pairs at the trial "
                  "level counts sessions")


def hierarchy_section(subject: dict[str, str], role: dict[str, str], repeat_comparisons: dict[str, dict],
                      pair_comparisons: dict[tuple[str, str], dict],
                      ceiling: tuple[dict, dict] | None) -> tuple[dict, list[str], bytes]:
    """The consistency hierarchy (stats.hierarchy) of PNBA's comparisons and, with behaviour, of the
    ceiling's (condition_ceiling: (pairs, repeats)): (JSON entry, text lines, figure)."""
    levels = stats.hierarchy(repeat_comparisons, pair_comparisons, subject, role)
    ceiling_levels = stats.hierarchy(ceiling[1], ceiling[0], subject, role) if ceiling else None
    results = stats.hierarchy_result(levels, ceiling_levels)
    controls = sorted({subject[m] for m in subject if role[m] == "control"})
    entry = {"levels": stats.LEVELS, "groups": stats.HIERARCHY_GROUPS, "controls": controls,
             "note": HIERARCHY_NOTE, "results": results}
    return entry, hierarchy_lines(results, controls), hierarchy_figure(levels, results)


def hierarchy_lines(results: dict, controls: list[str]) -> list[str]:
    """The hierarchy table with what its levels and groups mean."""
    return ["== consistency hierarchy: same condition vs different, centred, pooled over blocks (perm p); "
             "ceiling = the same on the true behaviour",
             *(f"{level:<8} {meaning}" for level, meaning in stats.LEVELS.items()),
             *(f"{group:<16} {meaning}" for group, meaning in stats.HIERARCHY_GROUPS.items()),
             f"controls: {', '.join(controls)}" if controls else
             "controls: none named (--control): held-out rows hold every held-out subject",
             HIERARCHY_NOTE, stats.hierarchy_table(results)]


def hierarchy_figure(levels: dict[str, dict], results: dict) -> bytes:
    """One row per group, one column per level: centred paired vs unpaired r (stats.histogram_figure)."""
    panels = []
    for group, cells in levels.items():
        row = []
        for level in stats.LEVELS:
            if level not in cells:
                row.append(("", None))
                continue
            e = results[group][level]
            n = e["n_animal_pairs"]
            unit = ("animal" if level == "trial" else "pair") + ("s" if n > 1 else "")
            name = f"{group}: {level} level ({n} {unit})"
            if "ceiling" in e:
                name += f", behaviour d = {stats.fmt(e['ceiling']['cohens_d'], '.2f')}"
            row.append((name, cells[level]["comparisons"]["centred"]["pooled"]))
        panels.append(row)
    return stats.histogram_figure(panels, "consistency hierarchy, centred: same condition (paired) vs other "
                                          "pairs")


DECODING_METHOD = {
    "zero_shot": "each decoder fitted once on all analysed trials of the training animals (mu_x per frame -> "
                 "behaviour; mu_x_free, their identity-free path, where the model has unit embeddings), "
                 "scored with no refit; groups: heldout (held-out non-control animals), control, "
                 "train (in-sample: the fitting trials themselves); hyper-parameters chosen across subjects "
                 "(ridge alpha by leave-subjects-out CV, networks early-stopped on held-out subjects)",
    "shrunk": "the zero-shot predictions of each scored animal shrunk towards their own mean per component "
              "by the chance-corrected share of their variance explained by (condition, frame) cells "
              "(decoding.consistency_shrinkage): condition labels only, never the scored behaviour",
    "input_range": f"share of a scored animal's frames whose Mahalanobis distance from the fitting frames "
                   f"exceeds the {decoding.OUT_OF_RANGE_QUANTILE} quantile of the fitting frames' own; out "
                   f"of range above {decoding.OUT_OF_RANGE_FRACTION}; reference: each training subject "
                   "against the others",
    "behaviour": "in the model's own space (recordings/reps.py behaviour_space: velocity / the session's RMS "
                 "speed), one unit for every animal; animals in different spaces are never mixed",
    "within_animal": f"the bound: the same decoders fitted and scored inside each held-out animal, "
                     f"{decoding.FOLDS}-fold over its trials, stratified by condition",
    "cross_modal": "the zero-shot fit from mu_y, which is computed from the kinematics: a reference, not a "
                   "neural result",
    "r2": "1 - SSE/SST per velocity component over all frames of all scored trials, SST about their own "
          "mean; 'mean' averages the components",
    "decoders": f"linear: ridge, alpha by {decoding.FOLDS}-fold CV (over subjects when zero-shot); mlp: one "
                f"hidden layer of {decoding.HIDDEN_MLP}; gru: {decoding.HIDDEN_GRU} units over a trial's "
                "frames; inputs standardised with the fitting set's statistics; networks early-stopped on "
                "held-out trials (subjects when zero-shot), readout starting at zero (the fitting mean)",
}


def per_animal(animals: dict[str, list[TrialRep]], array: str) -> dict[str, list[np.ndarray]]:
    """{animal: the trials' `array` (T, ...) in order}."""
    return {m: [t.arrays[array] for t in ts] for m, ts in animals.items()}


def decoding_skipped(animals: dict[str, list[TrialRep]], role: dict[str, str]) -> str | None:
    """Why zero-shot decoding cannot run (no training or no held-out non-control animal; behaviour spaces
    that differ, e.g. a version-2 file with behaviour in each file's units), or None."""
    fit_on = [m for m in animals if role[m] == "train"]
    heldout = [m for m in animals if role[m] == "heldout"]
    if not fit_on or not heldout:
        return (f"decoding skipped: needs training and held-out animals ({len(fit_on)} training, "
                f"{len(heldout)} held-out non-control)")
    try:
        decoding.check_spaces({m: ts[0].behaviour_space for m, ts in animals.items()}, list(animals))
    except decoding.BehaviourSpaceError as e:
        return f"decoding skipped: {e}"
    return None


def zero_shot_decoding(animals: dict[str, list[TrialRep]], role: dict[str, str], score: dict[str, list[str]],
                       seed: int, latents: str = "mu_x", decoders=tuple(decoding.DECODERS)) -> dict:
    """decoding.zero_shot fitted on the training animals (role "train"), hyper-parameters across their
    subjects, scored on score {group: animals}. latents "mu_x": the identity-free path, which is what a
    held-out animal gets (mu_x_free where the model has unit embeddings, else mu_x); or "mu_y"."""
    if latents == "mu_x":
        x = {m: [t.arrays.get("mu_x_free", t.arrays["mu_x"]) for t in ts] for m, ts in animals.items()}
    else:
        x = per_animal(animals, latents)
    labels = {m: [t.stimulus for t in ts] for m, ts in animals.items()}
    spaces = {m: ts[0].behaviour_space for m, ts in animals.items()}
    fit_on = [m for m in animals if role[m] == "train"]
    return decoding.zero_shot(x, per_animal(animals, "behaviour"), labels, fit_on, score, seed,
                              subjects(animals), spaces, decoders)


def decoding_section(animals: dict[str, list[TrialRep]], role: dict[str, str],
                     seed: int) -> tuple[dict, list[str]]:
    """Zero-shot behaviour decoding (decoding.py) from mu_x, the within-animal bound and the mu_y reference.
    A part that cannot run is one "skipped" line (decoding_skipped: the whole section). Returns (JSON entry,
    text lines)."""
    title = "== zero-shot behaviour decoding: R² of the behaviour (mean over components)"
    reason = decoding_skipped(animals, role)
    if reason:
        return {"skipped": reason}, [title, reason]
    fit_on, heldout, control = ([m for m in animals if role[m] == r] for r in ("train", "heldout", "control"))
    labels = {m: [t.stimulus for t in ts] for m, ts in animals.items()}
    behaviour = per_animal(animals, "behaviour")
    out = {"method": DECODING_METHOD, "fit_on": fit_on, "heldout": heldout, "control": control,
           "behaviour_space": animals[fit_on[0]][0].behaviour_space,
           "fitted_on_identity_free": any("mu_x_free" in t.arrays for m in fit_on for t in animals[m]),
           "zero_shot": zero_shot_decoding(animals, role, {"heldout": heldout, "control": control,
                                                           "train": fit_on}, seed),
           "within_animal": decoding.within_animal(per_animal(animals, "mu_x"), behaviour, labels, heldout,
                                                   seed=seed)}
    if all("mu_y" in t.arrays for ts in animals.values() for t in ts):
        out["cross_modal"] = zero_shot_decoding(animals, role, {"heldout": heldout}, seed, "mu_y")
    else:
        out["cross_modal"] = {"skipped": "cross-modal reference skipped: some trials have no mu_y"}
    return out, [title, *decoding_lines(out)]


def _range_note(entry: dict) -> str:
    """" [OUT OF RANGE]" after a score whose input_range entry is flagged, else ""."""
    return " [OUT OF RANGE]" if entry["out_of_range"] else ""


def decoding_lines(out: dict) -> list[str]:
    """Text table of decoding_section's entry: one row per decoder, one column per set scored (zero-shot
    columns raw and shrunk), then input_range_lines."""
    zero = out["zero_shot"]
    shrunk = {d: {"groups": zero[d]["shrunk"]["groups"]} for d in decoding.DECODERS}
    columns = [("zero-shot", zero, "heldout"), ("shrunk", shrunk, "heldout"),
               ("within", out["within_animal"], None), ("mu_y ref", out["cross_modal"], "heldout"),
               ("control", zero, "control"), ("ctl shrunk", shrunk, "control"), ("train fit", zero, "train")]
    columns = [(name, entry, group) for name, entry, group in columns
               if "skipped" not in entry and (group is None or group in entry["linear"]["groups"])]

    def mean(entry: dict, group: str | None) -> float:
        return entry["pooled"]["mean"] if group is None else entry["groups"][group]["mean"]

    ranges = zero["linear"]["input_range"]
    flagged = {g for g, e in ranges["groups"].items() if e["out_of_range"]}
    head = f"{'decoder':<8}" + "".join(f" {name:>10}" for name, _, _ in columns)
    lines = [f"training animals: {', '.join(out['fit_on'])}; held-out: {', '.join(out['heldout'])}; control: "
             f"{', '.join(out['control']) or 'none named (--control)'}; behaviour space: "
             f"{out.get('behaviour_space') or 'unnamed'}",
             "zero-shot = fitted on the training animals' mu_x, scored on the held-out ones with no refit; "
             "shrunk = the same predictions shrunk towards their mean by their consistency across trials of "
             "a condition (labels only, no behaviour); within = k-fold inside each held-out animal (the "
             "bound); mu_y ref = the zero-shot fit from mu_y (computed from the kinematics); train fit = "
             "in-sample; * = out of range (below)", head, "-" * len(head)]
    for decoder in decoding.DECODERS:
        lines.append(f"{decoder:<8}" + "".join(
            f" {stats.fmt(mean(entry[decoder], group), '.3f') + ('*' if group in flagged else ''):>10}"
            for _, entry, group in columns))
    if "skipped" in out["cross_modal"]:
        lines.append(out["cross_modal"]["skipped"])
    return lines + input_range_lines(out, flagged)


def input_range_lines(out: dict, flagged: set[str]) -> list[str]:
    """How far each scored group's and animal's mu_x lie outside the fitting inputs, why a group is flagged
    (flagged: the groups out of range), and every scored animal's zero-shot R² raw and shrunk."""
    zero = out["zero_shot"]
    ranges = zero["linear"]["input_range"]
    reference = [e["outside_fraction"] for e in ranges["reference"].values()]
    lines = [f"input range (mu_x): share of an animal's frames beyond the {ranges['quantile']:.0%} "
             f"quantile of the fitting frames' Mahalanobis distance (same distribution: about "
             f"{1 - ranges['quantile']:.0%}); flagged out of range above {ranges['flag_above']:.0%}"
             + (f"; a training subject left out of the fit: {min(reference):.1%} to {max(reference):.1%}"
                if reference else "")]
    for group, e in ranges["groups"].items():
        if group != "train":
            lines.append(f"  {group}: {e['outside_fraction']:.1%} of frames outside{_range_note(e)}")
    if "skipped" not in out["cross_modal"]:
        e = out["cross_modal"]["linear"]["input_range"]["groups"]["heldout"]
        lines.append(f"  mu_y (reference), heldout: {e['outside_fraction']:.1%} of frames outside"
                     f"{_range_note(e)}")
    for group in sorted(flagged - {"train"}):
        lines.append(f"OUT OF RANGE, {group}: its mu_x lie outside the latents the decoders were fitted on, "
                     "so their zero-shot R² measures extrapolation beyond the fitted inputs, not the "
                     "information its latents carry about the behaviour")
    scored = [*out["heldout"], *out["control"]]
    lines.append("zero-shot R² per scored animal (raw / shrunk; frames outside the fitted range):")
    for m in scored:
        e = ranges["animals"][m]
        lines.append(f"  {m}: " + ", ".join(
            f"{d} {stats.fmt(zero[d]['animals'][m]['mean'], '.3f')} / "
            f"{stats.fmt(zero[d]['shrunk']['animals'][m]['mean'], '.3f')}" for d in decoding.DECODERS)
            + f"; outside {e['outside_fraction']:.1%}{_range_note(e)}")
    return lines


# options of stats_baselines.py, which reads the recordings: here they are one error line pointing there
MOVED_OPTIONS = ("--baselines", "--data", "--pcs", "--splits", "--log1p", "--cebra-iterations")


def control_parser() -> argparse.ArgumentParser:
    """--control, shared with stats_baselines.py (an argparse parent: add_help=False)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--control", default=[], type=lambda text: [n for n in text.split(",") if n],
                        metavar="SUBJECT,...",
                        help="comma-separated negative-control subjects: NWB subjects (every session of "
                             "that monkey) or mouse names (default: none)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    moved = [a.split("=")[0] for a in argv if a.split("=")[0] in MOVED_OPTIONS]
    if moved:
        print(f"error: {moved[0]}: the baselines and the rates ridge read the recordings, so they are their "
              f"own stage: python stats_baselines.py REPS {moved[0]} ... (README \"Baselines beside PNBA\")",
              file=sys.stderr)
        return 2
    parser = control_parser()
    options, rest = parser.parse_known_args(argv)
    return stats.run_cli(__doc__, rest, functools.partial(analyse, controls=options.control),
                         data.read_representations, (data.DataError,), parents=(parser,),
                         epilog="example: python stats_zeroshot.py runs/RUN/reps.h5 --control T")


if __name__ == "__main__":
    raise SystemExit(main())
