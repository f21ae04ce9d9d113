"""python stats_zeroshot.py [reps.h5] [--out DIR] [--permutations 1000] [--seed 0]
    [--baselines pca_cca,cebra,pca,stimulus,summary] [--data DIR ...] [--pcs 8] [--splits 5] [--log1p]
    [--cebra-iterations 2000] [--control SUBJECT,...]
python stats_zeroshot.py runs/demo/reps.h5 --out results/
python stats_zeroshot.py runs/demo/reps.h5 --baselines pca_cca,cebra,pca,stimulus
python stats_zeroshot.py runs/monkey/reps.h5 --control T --data data_synth/monkey

Zero-shot preserved representations: for every pair of animals that share stimuli (pairs of held-out
animals first, flagged), r(mu_x of A, mu_x of B) for trials of the same stimulus (paired) against all other
trial pairs (unpaired); trial-level consistency across repeats within each animal (same statistics); a
two-way ANOVA (pair x paired) when there are several pairs. Trials of unknown stimulus (-1) are left out.
Definitions of centring, blocks and the permutation test: stats.py. Writes zeroshot.json, zeroshot.txt,
zeroshot_blocks.png (distributions per block) and zeroshot_matrix.png (same-vs-different similarity for a
sample of trials of the first pair), by default beside the representations file.

--baselines puts model-free alignments beside PNBA on the same pairs, with the same statistics (baselines.py):
pca_cca (per-animal PCA + CCA fitted on a random half of the stimuli, scored on the other trials, --splits
halves), cebra (multi-session CEBRA-Behavior with video PCs as labels, same halves; optional package),
pca (each animal's own PCs, unaligned: the floor), stimulus (video PCs: the ceiling) and summary (mean, sd
and quantiles over each animal's z-scored neurons per frame: identity-free, nothing fitted). They read the
responses and videos of the trials in the representations file from the data folders its config names
(or --data DIR ..., after reps.h5), opened as that config says; --pcs components (default 8), --log1p
before the neural PCA, --cebra-iterations training steps per split (CPU: about 0.1-0.3 s each).
Adds "baselines" to zeroshot.json, a table (also printed) and per-block tables to zeroshot.txt, and
zeroshot_baselines.png (one column per method, same axes as zeroshot_blocks.png).

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
  inside each held-out animal), the same zero-shot fit from mu_y (cross-modal reference) and a ridge on the
  held-out sessions' smoothed, lagged spike counts (the classic within-animal decoder; its NWB files are
  found by subject and session under --data or the config's data folders; one "skipped" line if they
  cannot be read). "decoding" in zeroshot.json, a table (also printed) in zeroshot.txt.
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np

import baselines
import config
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


def analyse(trials: list, path: str, n_perm: int, seed: int, options: dict | None = None) -> dict[str, bytes]:
    """Read the representations, compare, and render {file name: content}. options (or None): the
    baselines to run beside PNBA (see baseline_section), "control" (subjects that are negative controls)
    and "spikes" (the rates baseline's reader, see decoding_section)."""
    animals = stats.by_animal([t for t in trials if t.stimulus >= 0])
    stimuli = {m: {t.stimulus for t in ts} for m, ts in animals.items()}
    heldout = {m: ts[0].heldout for m, ts in animals.items()}
    # pairs of held-out animals first, then pairs with one held-out animal, then the rest
    pairs = sorted(((a, b) for a, b in itertools.combinations(sorted(animals), 2) if stimuli[a] & stimuli[b]),
                   key=lambda p: (-heldout[p[0]] - heldout[p[1]], p))
    if not pairs:
        raise stats.StatsError(f"{path}: no two animals share a stimulus")
    baseline = options and options.get("names")
    sessions = open_sessions(animals, path, options) if baseline else None    # fail before the work
    role = roles(animals, (options or {}).get("control") or (), path)
    rng = np.random.default_rng(seed)

    entries, centred = [], []         # centred comparisons are kept for the ANOVA and the figures
    pair_comparisons, repeat_comparisons = {}, {}      # all kinds, for the hierarchy
    for a, b in pairs:
        (xa, la, ta), (xb, lb, tb) = _columns(animals[a]), _columns(animals[b])
        c = stats.between(xa, xb, la, lb, ta, tb, n_perm, rng)
        entries.append({"a": a, "b": b, "heldout": heldout[a] and heldout[b], **stats.result(c)})
        centred.append(c["centred"])
        pair_comparisons[a, b] = c
    repeats = {}
    for mouse, trials in animals.items():
        x, labels, tiers = _columns(trials)
        if len(np.unique(labels)) == len(labels):
            continue
        c = stats.within(x, labels, tiers, n_perm, rng)
        repeats[mouse] = {"heldout": heldout[mouse], **stats.result(c)}
        repeat_comparisons[mouse] = c
    with_behaviour = all("behaviour" in t.arrays for ts in animals.values() for t in ts)
    ceiling_pairs, ceiling_repeats = condition_ceiling(animals, pairs, list(repeats), n_perm, seed) \
        if with_behaviour else ({}, {})
    if with_behaviour:
        for e in entries:
            add_ceiling(e, ceiling_pairs[e["a"], e["b"]])
        for mouse, e in repeats.items():
            add_ceiling(e, ceiling_repeats[mouse])
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
            ("repeats within animals", [c["centred"] for c in repeat_comparisons.values()])]
    panels = [[(f"{name}, {block} (centred)", stats.pool(cs)[block]) for block in ("pooled", *stats.BLOCKS)]
              for name, cs in rows if cs]
    a, b = pairs[0]
    files = {"zeroshot_blocks.png": stats.histogram_figure(panels, "same stimulus (paired) vs other pairs"),
             "zeroshot_matrix.png": matrix_figure(animals[a], animals[b], f"{names[0]}, trials by stimulus",
                                                  np.random.default_rng(seed))}
    if with_behaviour:
        lines += ["", *ceiling_lines(names, entries, repeats)]
    subject = subjects(animals)
    if len(set(subject.values())) < len(subject):       # a subject with several sessions: a session level
        levels = stats.hierarchy(repeat_comparisons, pair_comparisons, subject, role)
        ceiling = stats.hierarchy(ceiling_repeats, ceiling_pairs, subject, role) if with_behaviour else None
        controls = sorted({subject[m] for m in animals if role[m] == "control"})
        out["hierarchy"] = {"levels": stats.LEVELS, "groups": stats.HIERARCHY_GROUPS, "controls": controls,
                            "note": HIERARCHY_NOTE, "results": stats.hierarchy_result(levels, ceiling)}
        summary = hierarchy_lines(out["hierarchy"]["results"], controls)
        lines += ["", *summary]
        print("\n".join(summary))
        files["zeroshot_hierarchy.png"] = hierarchy_figure(levels, out["hierarchy"]["results"])
    if with_behaviour:
        out["decoding"], summary = decoding_section(animals, role, path, seed, options or {})
        lines += ["", *summary]
        print("\n".join(summary))
    if baseline:
        out["baselines"], summary, detail, files["zeroshot_baselines.png"] = baseline_section(
            animals, sessions, pairs, entries, centred, n_perm, seed, options)
        lines += ["", *summary, "", *detail]
        print("\n".join(summary))
    text = ("\n".join(lines) + "\n").encode()
    return {"zeroshot.json": stats.json_bytes(out), "zeroshot.txt": text, **files}


# ---------------------------------------------------------------------------------------------
# Recordings with behaviour and subject labels (monkey reaching): ceiling, hierarchy, decoding
# ---------------------------------------------------------------------------------------------

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
    between = {}
    for a, b in pairs:
        (xa, la, ta), (xb, lb, tb) = _columns(animals[a], "behaviour"), _columns(animals[b], "behaviour")
        between[a, b] = stats.between(xa, xb, la, lb, ta, tb, n_perm, rng)
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
    "rates_ridge": f"within-animal ridge from Gaussian-smoothed spike counts (sd {decoding.SMOOTH_BINS} "
                   f"bins, {decoding.HISTORY} lagged bins), {decoding.FOLDS}-fold over the spike reader's "
                   "trials (default: every successful trial of the session's NWB file); NaN counts (unit not "
                   "observed) imputed with the unit's mean over the observed bins of the fitting fold",
    "r2": "1 - SSE/SST per velocity component over all frames of all scored trials, SST about their own "
          "mean; 'mean' averages the components",
    "decoders": f"linear: ridge, alpha by {decoding.FOLDS}-fold CV (over subjects when zero-shot); mlp: one "
                f"hidden layer of {decoding.HIDDEN_MLP}; gru: {decoding.HIDDEN_GRU} units over a trial's "
                "frames; inputs standardised with the fitting set's statistics; networks early-stopped on "
                "held-out trials (subjects when zero-shot), readout starting at zero (the fitting mean)",
}
RATES_TARGET = 0.8        # zero-shot linear R² should reach this fraction of the within-animal rates ridge


def decoding_section(animals: dict[str, list[TrialRep]], role: dict[str, str], path: str, seed: int,
                     options: dict) -> tuple[dict, list[str]]:
    """Zero-shot behaviour decoding (decoding.py) from mu_x, the within-animal bound, the mu_y reference
    and the rates ridge on the held-out animals' spikes (options["spikes"], a callable (animals, path) ->
    {animal: (spikes (T, N) per trial, velocity (T, D) per trial, conditions)}; default nwb_spikes). A
    part that cannot run is one "skipped" line; animals whose behaviour spaces differ (e.g. a version-2
    representations file, behaviour in each file's units) skip the whole section. Returns (JSON entry, text
    lines)."""
    fit_on = [m for m in animals if role[m] == "train"]
    heldout = [m for m in animals if role[m] == "heldout"]
    control = [m for m in animals if role[m] == "control"]
    title = "== zero-shot behaviour decoding: R² of the behaviour (mean over components)"
    if not fit_on or not heldout:
        reason = f"decoding skipped: needs training and held-out animals ({len(fit_on)} training, " \
                 f"{len(heldout)} held-out non-control)"
        return {"skipped": reason}, [title, reason]
    spaces = {m: ts[0].behaviour_space for m, ts in animals.items()}
    try:
        decoding.check_spaces(spaces, [*fit_on, *heldout, *control])
    except decoding.BehaviourSpaceError as e:
        reason = f"decoding skipped: {e}"
        return {"skipped": reason}, [title, reason]

    def arrays(name: str) -> dict[str, list[np.ndarray]]:
        return {m: [t.arrays[name] for t in ts] for m, ts in animals.items()}

    behaviour, labels = arrays("behaviour"), {m: [t.stimulus for t in ts] for m, ts in animals.items()}
    subject = subjects(animals)
    # the decoders meet held-out animals' identity-free latents: fitted on the same path of the training
    # animals (mu_x_free, written for models with unit embeddings), not on their identity-aware mu_x
    identity_free = {m: [t.arrays.get("mu_x_free", t.arrays["mu_x"]) for t in ts]
                     for m, ts in animals.items()}
    out = {"method": DECODING_METHOD, "fit_on": fit_on, "heldout": heldout, "control": control,
           "behaviour_space": spaces[fit_on[0]],
           "fitted_on_identity_free": any("mu_x_free" in t.arrays for m in fit_on for t in animals[m]),
           "zero_shot": decoding.zero_shot(identity_free, behaviour, labels, fit_on,
                                           {"heldout": heldout, "control": control, "train": fit_on}, seed,
                                           subject, spaces),
           "within_animal": decoding.within_animal(arrays("mu_x"), behaviour, labels, heldout, seed=seed)}
    if all("mu_y" in t.arrays for ts in animals.values() for t in ts):
        out["cross_modal"] = decoding.zero_shot(arrays("mu_y"), behaviour, labels, fit_on,
                                                {"heldout": heldout}, seed, subject, spaces)
    else:
        out["cross_modal"] = {"skipped": "cross-modal reference skipped: some trials have no mu_y"}
    read_spikes = options.get("spikes") or (lambda chosen, at: nwb_spikes(chosen, at, options))
    try:
        raw = read_spikes({m: animals[m] for m in heldout}, path)
        out["rates_ridge"] = decoding.rates_baseline({m: raw[m][0] for m in heldout},
                                                     {m: raw[m][1] for m in heldout},
                                                     {m: raw[m][2] for m in heldout}, seed)
        out["linear_over_rates"] = stats.ratio(out["zero_shot"]["linear"]["groups"]["heldout"]["mean"],
                                               out["rates_ridge"]["pooled"]["mean"])
    except stats.StatsError as e:
        out["rates_ridge"] = {"skipped": f"rates baseline skipped: {e}"}
    return out, [title, *decoding_lines(out)]


def _range_note(entry: dict) -> str:
    """" [OUT OF RANGE]" after a score whose input_range entry is flagged, else ""."""
    return " [OUT OF RANGE]" if entry["out_of_range"] else ""


def decoding_lines(out: dict) -> list[str]:
    """Text table of decoding_section's entry: one row per decoder, one column per set scored (zero-shot
    columns raw and shrunk), then the input range of every scored animal and why a row is flagged."""
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
    lines += [entry["skipped"] for entry in (out["cross_modal"], out["rates_ridge"]) if "skipped" in entry]
    if "skipped" not in out["rates_ridge"]:
        rates = out["rates_ridge"]["pooled"]["mean"]
        lines.append(f"rates ridge (within-animal, spike counts): R² {stats.fmt(rates, '.3f')}; "
                     f"zero-shot linear / rates ridge = {stats.fmt(out['linear_over_rates'], '.2f')} "
                     f"(target >= {RATES_TARGET})")
    reference = [e["outside_fraction"] for e in ranges["reference"].values()]
    lines.append(f"input range (mu_x): share of an animal's frames beyond the {ranges['quantile']:.0%} "
                 f"quantile of the fitting frames' Mahalanobis distance (same distribution: about "
                 f"{1 - ranges['quantile']:.0%}); flagged out of range above {ranges['flag_above']:.0%}"
                 + (f"; a training subject left out of the fit: {min(reference):.1%} to {max(reference):.1%}"
                    if reference else ""))
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


def nwb_spikes(animals: dict[str, list[TrialRep]], path: str, options: dict) -> dict[str, tuple]:
    """{animal: (spike counts (T, N) per trial, NaN where a unit was not recorded; velocity (T, D) per trial
    in the model's space, as extract.py stores it; conditions)} of each animal's trials in the representations
    file, read from the data folders (--data or the file's config) and opened as that config's data section
    says (bins, window, area), so that the trials and bins are the model's. StatsError when they cannot be
    read."""
    cfg, paths = data_section(path, options, "the rates baseline reads spike counts")
    try:
        monkeys = {m.name: m for m in data.mice_from_config(cfg, paths)}
    except data.DataError as e:
        raise stats.StatsError(str(e)) from None
    out = {}
    for name, trials in animals.items():
        if name not in monkeys or monkeys[name].stimulus_kind != "behaviour":
            raise stats.StatsError(f"{path}: session {name} is not among the NWB sessions in "
                                   f"{', '.join(paths)}")
        m = monkeys[name]
        spikes = m.session_data.spikes[:, :, m.units]
        out[name] = ([spikes[t.trial] for t in trials], [m.normalised_behaviour(t.trial) for t in trials],
                     np.array([t.stimulus for t in trials]))
    return out


# ---------------------------------------------------------------------------------------------
# Baselines beside PNBA (--baselines): same pairs, same trials, same statistics
# ---------------------------------------------------------------------------------------------

PNBA_FITS = "PNBA encoder (mu_x) trained on the training animals; zero-shot for pairs of held-out animals"


def short_names(names) -> dict[str, str]:
    """Animal folder names without their '-Video-<hash>' suffix, where the short names stay distinct."""
    short = {n: n.split("-Video-")[0] for n in names}
    return short if len(set(short.values())) == len(short) else {n: n for n in names}


def data_section(path: str, options: dict, reader: str) -> tuple[config.DataConfig, list[str]]:
    """The data section of the representations file's config and the data folders to read (options["data"]
    if given, else the config's); StatsError naming `reader` (what reads them) when there are none."""
    attrs = options.get("attrs") or {}
    try:
        cfg = config.from_dict(json.loads(attrs["config"])).data if "config" in attrs else config.DataConfig()
    except (json.JSONDecodeError, TypeError, AttributeError, config.ConfigError) as e:
        raise stats.StatsError(f"{path}: unreadable config attribute ({type(e).__name__}: {e}); {reader} "
                               "from the data folders its data section names") from None
    paths = list(options.get("data") or cfg.paths)
    if not paths:
        raise stats.StatsError(f"{path}: names no data folders (no config with data.paths); {reader} "
                               "from them: pass --data")
    return cfg, paths


def open_sessions(animals: dict[str, list], path: str, options: dict) -> dict[str, baselines.Session]:
    """A baselines.Session per analysed animal: its trials of the representations file, read from the data
    folders named by the file's config (or options["data"]), opened as that config's data section says."""
    cfg, paths = data_section(path, options, "the baselines read responses and videos")
    mice = {m.name: m for m in data.mice_from_config(cfg, paths)}
    missing = [m for m in animals if m not in mice]
    if missing:
        raise stats.StatsError(f"{path}: animal {missing[0]} is not in the data folders {', '.join(paths)} "
                               f"({len(missing)} missing); pass the folders it came from with --data")
    return {m: baselines.mouse_session(mice[m], trials) for m, trials in animals.items()}


def _row(name: str, width: int, method: str, zero: str, r: dict) -> str:
    """One line of the baseline table: a stats.result() entry (averaged ones carry "sd")."""
    if "paired_mean" not in r:
        return f"{name:<{width}} {method:<11} {zero:<9} {r.get('skipped') or 'not scored'}"
    sd = (r.get("sd") or {}).get("cohens_d")
    return (f"{name:<{width}} {method:<11} {zero:<9} {stats.fmt(r['paired_mean'], '.3f'):>8} "
            f"{stats.fmt(r['unpaired_mean'], '.3f'):>10} {stats.fmt(r['cohens_d'], '.2f'):>7} "
            f"{stats.fmt(sd, '.2f'):>6} {stats.fmt(r['perm_p'], '.3g'):>7} "
            f"{stats.fmt(r['n_paired'], '.0f'):>8}")


def baseline_section(animals: dict[str, list], sessions: dict[str, baselines.Session],
                     pairs: list[tuple[str, str]], entries: list[dict], centred: list[dict], n_perm: int,
                     seed: int, options: dict) -> tuple[dict, list[str], list[str], bytes]:
    """Run the baselines options["names"] on the sessions (open_sessions) of the pairs of the PNBA analysis
    (entries, centred: its results per pair, in the same order). Returns (JSON entry, summary lines,
    per-block lines, figure)."""
    fitted = {"pca_cca", "cebra"} & set(options["names"])
    reference = {m: [t.arrays["mu_x"] for t in trials] for m, trials in animals.items()} if fitted else None
    result = baselines.zeroshot(sessions, pairs, options["names"], n_perm, seed, options["pcs"],
                                options["log1p"], options["splits"], reference, options["cebra_iterations"])
    comparisons = result.pop("comparisons")
    methods = result["methods"]
    label = {m: "pnba@splits" if m == "reference" else m for m in methods}
    short = short_names(animals)
    pair_names = [f"{short[a]} x {short[b]}" + (" (held-out)" if e["heldout"] else "")
                  for (a, b), e in zip(pairs, entries, strict=True)]
    width = max(len(n) for n in [*pair_names, "pair"])
    head = (f"{'pair':<{width}} {'method':<11} {'zero-shot':<9} {'paired_r':>8} {'unpaired_r':>10} {'d':>7} "
            f"{'sd(d)':>6} {'perm_p':>7} {'n_paired':>8}")
    summary = ["== baselines beside PNBA: centred r, pooled over blocks (fitted methods: mean over splits, "
               "sd(d) over splits)", f"{'pnba':<11} {PNBA_FITS}"]
    summary += [f"{label[m]:<11} {e['fits']}" for m, e in methods.items()]
    summary += [e["skipped"] for e in methods.values() if e["skipped"]]
    summary += ["", head, "-" * len(head)]
    block_rows = []
    for p, (name, e) in enumerate(zip(pair_names, entries, strict=True)):
        zero = "yes" if e["heldout"] else "no"
        summary.append(_row(name, width, "pnba", zero, e))
        for m, me in methods.items():
            if not me["skipped"]:
                summary.append(_row(name, width, label[m], zero if m == "reference" else me["zero_shot"],
                                    me["pairs"][p]))
                if "paired_mean" in me["pairs"][p]:
                    block_rows += stats.table_rows(f"{name}, {label[m]}", me["pairs"][p])
    seconds = [f"reading responses and video {result['seconds']['read']:.1f} s (shared)"]
    seconds += [f"{label[m]} {e['wall_s']:.1f} s" for m, e in methods.items()]
    summary += ["", "wall time: " + "; ".join(seconds)]
    if result["cebra_version"]:
        summary.append(f"cebra version: {result['cebra_version']}")
    detail = ["== baselines per block (centred; fitted methods: mean over splits)",
              stats.table(block_rows, "pair, method") if block_rows else "no baseline was scored"]

    per_method = {"pnba": centred, **comparisons}
    panels = []
    for group, keep in (("held-out pairs", True), ("other pairs", False)):
        if not any(e["heldout"] == keep for e in entries):
            continue
        row = []
        for m, cs in per_method.items():
            if m in methods and methods[m]["skipped"]:
                continue                                     # a skipped method gets no column
            cs = [c for c, e in zip(cs, entries, strict=True) if c is not None and e["heldout"] == keep]
            row.append((f"{label.get(m, m)}, {group}", stats.pool(cs)["pooled"] if cs else None))
        panels.append(row)
    title = "PNBA and baselines, centred: same stimulus (paired) vs other pairs (fitted ones: first split)"
    return result, summary, detail, stats.histogram_figure(panels, title)


def main(argv: list[str] | None = None) -> int:
    # the baseline options, parsed here; run_cli parses the rest and lists these too in --help (parents)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--baselines", default="",
                        help="comma-separated model-free baselines beside PNBA: "
                             f"{','.join(baselines.BASELINES)} (default: none)")
    parser.add_argument("--data", nargs="+", default=None,
                        help="Sensorium mouse folders or a folder holding them, or .nwb files or folders "
                             "holding them, for the baselines and the spike decoder (default: the data the "
                             "file's config names)")
    parser.add_argument("--pcs", type=int, default=baselines.PCS,
                        help=f"components of the baselines (default {baselines.PCS})")
    parser.add_argument("--splits", type=int, default=baselines.SPLITS,
                        help=f"random halves of the stimuli for pca_cca, cebra (default {baselines.SPLITS})")
    parser.add_argument("--log1p", action="store_true", help="log1p the responses before the neural PCA")
    parser.add_argument("--cebra-iterations", type=int, default=baselines.CEBRA_PARAMS["max_iterations"],
                        help="CEBRA training steps per split (default "
                             f"{baselines.CEBRA_PARAMS['max_iterations']})")
    parser.add_argument("--control", default="",
                        help="comma-separated negative-control subjects: NWB subjects (every session of "
                             "that monkey) or mouse names (default: none)")
    options, rest = parser.parse_known_args(argv)
    names = [n for n in options.baselines.split(",") if n]
    controls = [n for n in options.control.split(",") if n]
    unknown = [n for n in names if n not in baselines.BASELINES]
    if unknown:
        parser.error(f"--baselines: unknown {', '.join(unknown)}; valid: {','.join(baselines.BASELINES)}")
    if min(options.pcs, options.splits, options.cebra_iterations) < 1:
        parser.error("--pcs, --splits and --cebra-iterations must be at least 1")
    attrs: dict = {}

    def read(path: str):
        trials, file_attrs = data.read_representations(path)
        attrs.update(file_attrs)
        return trials, file_attrs

    def run(trials: list, path: str, n_perm: int, seed: int) -> dict[str, bytes]:
        return analyse(trials, path, n_perm, seed,
                       {**vars(options), "names": names, "control": controls, "attrs": attrs})

    return stats.run_cli(__doc__, rest, run, read, (data.DataError, config.ConfigError), parents=(parser,),
                         epilog="example: python stats_zeroshot.py runs/RUN/reps.h5 --baselines "
                                "pca_cca,pca,stimulus")


if __name__ == "__main__":
    raise SystemExit(main())
