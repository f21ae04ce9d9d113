"""Statistics shared by stats_crossmodal.py, stats_zeroshot.py and stats_baselines.py: correlation sets,
centring, effect sizes, a stimulus-relabelling permutation test, a two-way ANOVA, the trial / session /
subject consistency hierarchy, and report / JSON / figure writing.

Definitions (the reports repeat them):
- r between two trials: Pearson r of the flattened (frames, latent) arrays over the frames both have (the
  common leading frames; same-stimulus trials have equal lengths).
- Centred (primary): before correlating, each animal's mean latent is subtracted, frame by frame, averaged
  over the animal's trials that have that frame and that enter the analysis. Raw r (as published) is
  dominated by a trial-independent template and is reported under "raw".
- Blocks: "train" = both trials of a pair in the train tier, "oracle" = both in the oracle tier; the
  top-level numbers pool every pair (all tiers, cross-tier pairs included).
- Tests are one-sided (paired > unpaired). Statistic of the permutation test: mean paired r - mean unpaired
  r. Null: between two trial sets (animals, or neural vs stimulus), the stimulus labels of side A are
  permuted as whole groups (all trials of a stimulus stay together, so repeats move as one) among the
  stimuli of the same tier; within one animal (repeats), labels are shuffled across trials of the same
  tier. Row 0 is the observed labelling; p = (1 + #{null >= observed}) / (1 + n_permutations).
  Welch t and Mann-Whitney U treat every pair as independent and are optimistic; verdicts use perm p.
- Every pair is used (no subsampling); pairs whose r is not finite (constant or non-finite arrays) are
  left out.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

import config

BLOCKS = ("train", "oracle")          # tiers reported as separate blocks; "pooled" is every pair
ALPHA = 0.05                          # verdict threshold on the permutation p
METHOD = {
    "r": "Pearson r of flattened (frames, latent) arrays over the common leading frames",
    "centring": "each animal's per-frame mean latent over its analysed trials (those having the frame) "
                "subtracted first; primary. 'raw' = uncentred, as published",
    "blocks": "train = both trials train tier, oracle = both oracle tier; top level pools all pairs",
    "tests": "one-sided, paired > unpaired; Welch t and Mann-Whitney U assume independent pairs",
    "permutation": "statistic mean paired r - mean unpaired r; stimulus labels permuted within tier "
                   "(whole stimulus groups between trial sets, trials within an animal); "
                   "p = (1 + #null >= observed) / (1 + n); k stimuli in a tier allow at most k! distinct "
                   "relabellings, so few stimuli cannot give a small p",
    "subsampling": "none: every pair is used",
}


# ---------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------

class StatsError(ValueError):
    """Input the statistics cannot use: one line naming the file and the problem."""


def load(path: str, read: Callable) -> list:
    """Trials of a representations file, checked: StatsError (one line naming the file) if unusable.

    read: the reader of the file format (data.read_representations; the scripts pass it in so that
    this module stays at the ground floor) returning (trials, attrs); trials are data.TrialRep.
    """
    try:
        trials, _ = read(path)
    except (KeyError, ValueError, OSError) as e:      # our format tag but a malformed layout
        raise StatsError(f"{path}: malformed representations file ({type(e).__name__}: {e})") from None
    if not trials:
        raise StatsError(f"{path}: holds no trials")
    latent = n_behaviour = None
    for t in trials:
        where = f"{path}: {t.mouse}/{t.tier}/{t.trial}"
        if "mu_x" not in t.arrays:
            raise StatsError(f"{where} has no mu_x")
        for name in ("mu_x", "mu_y"):
            x = t.arrays.get(name)
            if x is None:
                continue
            if x.ndim != 2 or (latent is not None and x.shape[1] != latent):
                raise StatsError(f"{where}/{name} has shape {x.shape}, expected (frames, {latent})")
            latent = x.shape[1]
            if not np.isfinite(x).all():
                raise StatsError(f"{where}/{name} holds non-finite values")
        behaviour = t.arrays.get("behaviour")
        if behaviour is not None:
            if behaviour.ndim != 2 or (n_behaviour is not None and behaviour.shape[1] != n_behaviour):
                raise StatsError(f"{where}/behaviour has shape {behaviour.shape}, expected (frames, "
                                 f"{n_behaviour or 'D'})")
            n_behaviour = behaviour.shape[1]
            if not np.isfinite(behaviour).all():
                raise StatsError(f"{where}/behaviour holds non-finite values")
    return trials


def by_animal(trials: list) -> dict[str, list]:
    """Trials grouped by mouse, in file order."""
    groups: dict[str, list] = {}
    for t in trials:
        groups.setdefault(t.mouse, []).append(t)
    return groups


def default_reps_path() -> str:
    """The newest runs/*/reps.h5 under the current folder; StatsError if there is none."""
    found = glob.glob(os.path.join("runs", "*", "reps.h5"))
    if not found:
        raise StatsError("no representations file given and none found at runs/*/reps.h5")
    return max(found, key=os.path.getmtime)


# ---------------------------------------------------------------------------------------------
# Correlations
# ---------------------------------------------------------------------------------------------

def _padded(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stack (frames_i, D) arrays into zero-padded (n, max_frames, D) float64 and their lengths (n,)."""
    lengths = np.array([len(x) for x in arrays])
    out = np.zeros((len(arrays), lengths.max(initial=0), arrays[0].shape[1]))
    for i, x in enumerate(arrays):
        out[i, :len(x)] = x
    return out, lengths


def centre(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Subtract the per-frame mean over the trials that have that frame. (frames_i, D) -> same, float64."""
    stacked, lengths = _padded(arrays)
    n_having = (lengths[:, None] > np.arange(stacked.shape[1])).sum(0)
    mean = stacked.sum(0) / np.maximum(n_having, 1)[:, None]
    return [np.asarray(x, np.float64) - mean[:len(x)] for x in arrays]


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit norm, so a dot product of two rows is their Pearson r."""
    x = x - x.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):   # a constant row gives NaN r, dropped later
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def correlation_matrix(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """r[i, j]: Pearson r of a[i] and b[j] flattened over their common leading frames.

    a, b: lists of (frames, D) arrays (one D). Returns (len(a), len(b)) float64; NaN where undefined.
    Pairs are handled in groups that share the common length n (rows of length n against columns of at
    least n, then longer rows against columns of length n), so each group is one matrix product.
    """
    xa, la = _padded(a)
    xb, lb = _padded(b)
    xa, xb = xa.reshape(len(a), -1), xb.reshape(len(b), -1)
    d = a[0].shape[1]
    r = np.full((len(a), len(b)), np.nan)
    for n in np.union1d(la, lb):
        if n == 0:
            continue
        for rows, cols in ((la == n, lb >= n), (la > n, lb == n)):
            if rows.any() and cols.any():
                r[np.ix_(rows, cols)] = _unit_rows(xa[rows, :n * d]) @ _unit_rows(xb[cols, :n * d]).T
    return r


# ---------------------------------------------------------------------------------------------
# Paired vs unpaired comparisons with a permutation null
# ---------------------------------------------------------------------------------------------

@dataclass
class Comparison:
    """One block's correlations split into paired (same stimulus) and unpaired, with a permutation null.

    paired (n_p,), unpaired (n_u,): float32 r. perm_sum, perm_n (n_perm + 1,): sum and count of r over the
    paired set under each relabelling; row 0 is the observed labelling. total_sum, total_n: all pairs of
    the block (paired + unpaired). n_stimuli: stimulus groups contributing paired values.
    """

    paired: np.ndarray
    unpaired: np.ndarray
    perm_sum: np.ndarray
    perm_n: np.ndarray
    total_sum: float
    total_n: int
    n_stimuli: int

    def __add__(self, other: Comparison) -> Comparison:
        """Pool two comparisons of disjoint trial sets (their relabellings are independent)."""
        return Comparison(np.concatenate([self.paired, other.paired]),
                          np.concatenate([self.unpaired, other.unpaired]),
                          self.perm_sum + other.perm_sum, self.perm_n + other.perm_n,
                          self.total_sum + other.total_sum, self.total_n + other.total_n,
                          self.n_stimuli + other.n_stimuli)


def block_masks(tiers_a: np.ndarray, tiers_b: np.ndarray) -> dict[str, np.ndarray]:
    """{"pooled"|"train"|"oracle": (n_a, n_b) bool} — which pairs each block holds."""
    masks = {"pooled": np.ones((len(tiers_a), len(tiers_b)), bool)}
    for tier in BLOCKS:
        masks[tier] = (tiers_a == tier)[:, None] & (tiers_b == tier)[None, :]
    return masks


def stratified_permutations(strata: np.ndarray, n_perm: int, rng: np.random.Generator) -> np.ndarray:
    """(n_perm + 1, n) indices: row 0 the identity, each other row permutes within equal strata."""
    perms = np.tile(np.arange(len(strata)), (n_perm + 1, 1))
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        perms[1:, idx] = rng.permuted(np.tile(idx, (n_perm, 1)), axis=1)
    return perms


def compare_between(r: np.ndarray, labels_a: np.ndarray, labels_b: np.ndarray, tiers_a: np.ndarray,
                    tiers_b: np.ndarray, n_perm: int, rng: np.random.Generator) -> dict[str, Comparison]:
    """Paired = same label, between two trial sets; null relabels side A's stimulus groups within tier.

    r: (n_a, n_b) correlations; labels_*: (n,) int stimulus labels; tiers_*: (n,) str.
    Returns {"pooled"|"train"|"oracle": Comparison}.
    """
    groups_a, group_of_a = np.unique(labels_a, return_inverse=True)
    groups_b, group_of_b = np.unique(labels_b, return_inverse=True)
    n_ga, n_gb = len(groups_a), len(groups_b)
    pos = np.searchsorted(groups_b, groups_a).clip(max=n_gb - 1)
    b_group_of_label = np.where(groups_b[pos] == groups_a, pos, -1)    # per A group; -1: not in B
    has = b_group_of_label >= 0
    # a stimulus shown in several tiers is its own stratum, so it is only swapped with its like
    group_tiers = np.array(["+".join(sorted(set(tiers_a[group_of_a == g]))) for g in range(n_ga)])
    perms = stratified_permutations(group_tiers, n_perm, rng)        # group g takes label groups_a[k]
    cell = (group_of_a[:, None] * n_gb + group_of_b[None, :]).ravel()
    paired = labels_a[:, None] == labels_b[None, :]
    out = {}
    for name, mask in block_masks(tiers_a, tiers_b).items():
        ok = mask & np.isfinite(r)
        sums = np.bincount(cell, np.where(ok, r, 0).ravel(), n_ga * n_gb).reshape(n_ga, n_gb)
        counts = np.bincount(cell, ok.ravel(), n_ga * n_gb).reshape(n_ga, n_gb)
        # gain[g, k]: the pairs of A group g with the B group that holds A group k's label
        gain_sum, gain_n = np.zeros((n_ga, n_ga)), np.zeros((n_ga, n_ga))
        gain_sum[:, has] = sums[:, b_group_of_label[has]]
        gain_n[:, has] = counts[:, b_group_of_label[has]]
        rows = np.arange(n_ga)
        out[name] = Comparison(r[ok & paired].astype(np.float32), r[ok & ~paired].astype(np.float32),
                               gain_sum[rows, perms].sum(1), gain_n[rows, perms].sum(1),
                               float(sums.sum()), int(counts.sum()), int((np.diag(gain_n) > 0).sum()))
    return out


def compare_within(r: np.ndarray, labels: np.ndarray, tiers: np.ndarray, n_perm: int,
                   rng: np.random.Generator) -> dict[str, Comparison]:
    """Paired = two different trials of one animal with the same label (pairs i < j); null shuffles labels
    across trials of the same tier (relabelling whole groups would leave the pairs unchanged).

    r: (n, n) symmetric; labels: (n,) int; tiers: (n,) str. Returns {"pooled"|"train"|"oracle": Comparison}.
    """
    upper = np.triu(np.ones(r.shape, bool), 1)
    paired = labels[:, None] == labels[None, :]
    perm_labels = labels[stratified_permutations(tiers, n_perm, rng)]
    # after shuffling, only trials of tiers holding a repeated label can form a same-label pair
    values, counts = np.unique(labels, return_counts=True)
    active = np.isin(tiers, tiers[np.isin(labels, values[counts > 1])])
    sub = np.ix_(active, active)
    m = int(active.sum())
    chunk = max(1, 4_000_000 // max(m * m, 1))
    out = {}
    for name, mask in block_masks(tiers, tiers).items():
        ok = mask & upper & np.isfinite(r)
        weights = np.stack([np.where(ok, r, 0)[sub].ravel(), ok[sub].ravel()], 1)     # (m*m, 2)
        null = np.empty((len(perm_labels), 2))
        for start in range(0, len(perm_labels), chunk):
            lab = perm_labels[start:start + chunk][:, active]
            same = (lab[:, :, None] == lab[:, None, :]).reshape(len(lab), -1)
            null[start:start + chunk] = same @ weights
        out[name] = Comparison(r[ok & paired].astype(np.float32), r[ok & ~paired].astype(np.float32),
                               null[:, 0], null[:, 1], float(np.where(ok, r, 0).sum()), int(ok.sum()),
                               len(np.unique(labels[np.nonzero(ok & paired)[0]])))
    return out


def between(a: list[np.ndarray], b: list[np.ndarray], labels_a, labels_b, tiers_a, tiers_b,
            n_perm: int, rng: np.random.Generator) -> dict[str, dict[str, Comparison]]:
    """Centred and raw comparisons of trial set a against trial set b (each centred over itself).

    a, b: lists of (frames, D). Returns {"centred"|"raw": {"pooled"|"train"|"oracle": Comparison}}.
    """
    la, lb, ta, tb = map(np.asarray, (labels_a, labels_b, tiers_a, tiers_b))
    return {"centred": compare_between(correlation_matrix(centre(a), centre(b)), la, lb, ta, tb, n_perm, rng),
            "raw": compare_between(correlation_matrix(a, b), la, lb, ta, tb, n_perm, rng)}


def within(a: list[np.ndarray], labels, tiers, n_perm: int,
           rng: np.random.Generator) -> dict[str, dict[str, Comparison]]:
    """Centred and raw comparisons among the trials of one animal (repeats vs non-repeats)."""
    labels, tiers = np.asarray(labels), np.asarray(tiers)
    centred = centre(a)
    return {"centred": compare_within(correlation_matrix(centred, centred), labels, tiers, n_perm, rng),
            "raw": compare_within(correlation_matrix(a, a), labels, tiers, n_perm, rng)}


def crossmodal(trials: list, n_perm: int, rng: np.random.Generator) -> dict[str, dict[str, Comparison]]:
    """r(mu_x, mu_y) of one animal's trials (data.TrialRep), same stimulus vs other (between): paired are x
    of a trial with y of every trial of its stimulus; a trial of unknown stimulus (-1) pairs only with
    itself."""
    labels = [t.stimulus if t.stimulus >= 0 else -1 - k for k, t in enumerate(trials)]
    tiers = [t.tier for t in trials]
    return between([t.arrays["mu_x"] for t in trials], [t.arrays["mu_y"] for t in trials], labels, labels,
                   tiers, tiers, n_perm, rng)


def pair(a: list, b: list, n_perm: int, rng: np.random.Generator,
         array: str = "mu_x") -> dict[str, dict[str, Comparison]]:
    """r(array of A, array of B) over the trials (data.TrialRep) of two animals, same stimulus vs other
    (between)."""
    return between([t.arrays[array] for t in a], [t.arrays[array] for t in b], [t.stimulus for t in a],
                   [t.stimulus for t in b], [t.tier for t in a], [t.tier for t in b], n_perm, rng)


def pool(items: list[dict[str, Comparison]]) -> dict[str, Comparison]:
    """Pool {block: Comparison} dicts block by block (valid null only for disjoint trial sets)."""
    return {block: sum((item[block] for item in items[1:]), items[0][block]) for block in items[0]}


def combine(results: list[dict[str, dict[str, Comparison]]]) -> dict[str, dict[str, Comparison]]:
    """Pool between()/within() results of disjoint trial sets (e.g. the animals of a group), kind by kind."""
    return {kind: pool([res[kind] for res in results]) for kind in results[0]}


# ---------------------------------------------------------------------------------------------
# Consistency hierarchy: trial, session and subject levels
# ---------------------------------------------------------------------------------------------

LEVELS = {"trial": "two trials of one session (one animal key), as the repeats",
          "session": "trials of two sessions of one subject",
          "subject": "trials of sessions of two different subjects"}
HIERARCHY_GROUPS = {"heldout": "held-out non-control subjects only (zero-shot; the headline)",
                    "train": "training subjects only",
                    "train x heldout": "one training and one held-out non-control subject",
                    "control": "any pair with a control subject"}


def pair_group(roles: set[str]) -> str:
    """The HIERARCHY_GROUPS key of an animal pair (or one animal) from the roles of its animals, each
    "train", "heldout" or "control"."""
    if "control" in roles:
        return "control"
    return "train x heldout" if len(roles) > 1 else next(iter(roles))


def hierarchy(within_animal: dict[str, dict], between_animals: dict[tuple[str, str], dict],
              subject: dict[str, str], role: dict[str, str]) -> dict[str, dict[str, dict]]:
    """Per-animal and per-pair comparisons pooled into the LEVELS of the consistency hierarchy, per group.

    within_animal: {animal: within() result}; between_animals: {(a, b): between() result}; an animal is one
    recording session; subject: {animal: subject}; role: {animal: "train"|"heldout"|"control"}. Returns
    {group: {level: {"animals": ["a" or "a x b", ...], "comparisons": combine() of them}}}, groups in
    HIERARCHY_GROUPS order, only the cells holding something. Pairs that share an animal are pooled with
    independent relabellings (stats.pool), so the pooled null is approximate there.
    """
    cells: dict[tuple[str, str], list[tuple[str, dict]]] = {}
    for animal, result in within_animal.items():
        cells.setdefault((pair_group({role[animal]}), "trial"), []).append((animal, result))
    for (a, b), result in between_animals.items():
        level = "session" if subject[a] == subject[b] else "subject"
        cells.setdefault((pair_group({role[a], role[b]}), level), []).append((f"{a} x {b}", result))
    return {group: {level: {"animals": [name for name, _ in cells[group, level]],
                            "comparisons": combine([res for _, res in cells[group, level]])}
                    for level in LEVELS if (group, level) in cells}
            for group in HIERARCHY_GROUPS if any((group, level) in cells for level in LEVELS)}


def hierarchy_result(levels: dict[str, dict], ceiling: dict[str, dict] | None = None) -> dict:
    """JSON entries of hierarchy() cells: {group: {level: {**result(), "n_animal_pairs", "animal_pairs"}}}
    (trial level: animals, each paired with itself), and with ceiling (hierarchy() of the behaviour) also
    "ceiling" (its result()) and "fraction_of_ceiling" (centred pooled d over the ceiling's)."""
    out: dict[str, dict] = {}
    for group, cells in levels.items():
        for level, cell in cells.items():
            entry = {**result(cell["comparisons"]), "n_animal_pairs": len(cell["animals"]),
                     "animal_pairs": cell["animals"]}
            reference = (ceiling or {}).get(group, {}).get(level)
            if reference is not None:
                entry["ceiling"] = result(reference["comparisons"])
                entry["fraction_of_ceiling"] = ratio(entry["cohens_d"], entry["ceiling"]["cohens_d"])
            out.setdefault(group, {})[level] = entry
    return out


def hierarchy_table(entries: dict[str, dict]) -> str:
    """Text table of hierarchy_result() entries: centred, pooled over blocks; ceiling columns if present."""
    with_ceiling = any("ceiling" in e for cells in entries.values() for e in cells.values())
    head = (f"{'group':<16} {'level':<8} {'n_pairs':>7} {'n_stim':>6} {'paired_r':>8} {'unpaired_r':>10} "
            f"{'d':>7} {'perm_p':>8}")
    if with_ceiling:
        head += f" {'ceiling_d':>9} {'ceil_p':>8} {'fraction':>8}"
    lines = [head, "-" * len(head)]
    for group, cells in entries.items():
        for level, e in cells.items():
            line = (f"{group:<16} {level:<8} {e['n_animal_pairs']:>7} {e['n_stimuli']:>6} "
                    f"{fmt(e['paired_mean'], '.3f'):>8} {fmt(e['unpaired_mean'], '.3f'):>10} "
                    f"{fmt(e['cohens_d'], '.2f'):>7} {fmt(e['perm_p'], '.3g'):>8}")
            if "ceiling" in e:
                ceiling = e["ceiling"]
                line += (f" {fmt(ceiling['cohens_d'], '.2f'):>9} {fmt(ceiling['perm_p'], '.3g'):>8} "
                         f"{fmt(e['fraction_of_ceiling'], '.2f'):>8}")
            lines.append(line)
    return "\n".join(lines)


def ratio(value: float, reference: float) -> float:
    """value / reference (e.g. d over its ceiling d); NaN unless both are finite and reference > 0."""
    if value is None or reference is None or not (np.isfinite(value) and np.isfinite(reference)) \
            or reference <= 0:
        return float("nan")
    return float(value / reference)


# ---------------------------------------------------------------------------------------------
# Stimulus -> neural prediction scores and the data's own ceiling
# ---------------------------------------------------------------------------------------------

def per_neuron_corr(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Pearson r of every neuron over samples: (S, N), (S, N) -> (N,); NaN for a constant neuron. The
    Sensorium single-trial correlation is its mean over neurons, samples being the concatenated frames."""
    p = np.asarray(prediction, np.float64)
    t = np.asarray(target, np.float64)
    p, t = p - p.mean(0), t - t.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (p * t).sum(0) / (np.linalg.norm(p, axis=0) * np.linalg.norm(t, axis=0))


def repeat_ceiling(responses: list[np.ndarray], labels) -> float:
    """The data's own ceiling for a single-trial correlation: every trial that has repeats predicted by the
    mean of its other repeats (leave one out), scored like a model (mean over neurons of per_neuron_corr
    over the concatenated frames). responses: (frames, N) per trial; labels: stimulus per trial (repeats
    share one, and their common leading frames are used). NaN when no stimulus is repeated."""
    labels = np.asarray(labels)
    prediction, target = [], []
    for s in np.unique(labels):
        group = [responses[k] for k in np.flatnonzero(labels == s)]
        if len(group) < 2:
            continue
        n = min(len(r) for r in group)
        stack = np.stack([np.asarray(r[:n], np.float64) for r in group])
        prediction += [(stack.sum(0) - one) / (len(group) - 1) for one in stack]
        target += list(stack)
    if not target:
        return float("nan")
    return float(np.nanmean(per_neuron_corr(np.concatenate(prediction), np.concatenate(target))))


# ---------------------------------------------------------------------------------------------
# Identification: which video did the animal see, from its neural latent alone
# ---------------------------------------------------------------------------------------------

def matching_distance(mu_x: np.ndarray, logvar_x: np.ndarray, mu_y: np.ndarray,
                      logvar_y: np.ndarray) -> float:
    """The matching loss's distance ||mu_y - mu_x||^2 + sum var_y + sum var_x per frame, averaged over the
    common leading frames. Arrays (frames, D); the average keeps videos of other lengths comparable."""
    n = min(len(mu_x), len(mu_y))
    d = ((mu_y[:n] - mu_x[:n]) ** 2 + np.exp(logvar_y[:n]) + np.exp(logvar_x[:n])).sum(1)
    return float(d.mean())


def identification(trials: list, candidates: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict:
    """Rank of the true video among `candidates` for every trial, by the matching distance to its mu_x.

    trials: objects with .stimulus and .arrays holding mu_x, logvar_x (data.TrialRep); candidates:
    {stimulus id: (mu_y, logvar_y)}, every distinct video the animal saw. Trials whose stimulus is not a
    candidate are skipped. Returns top1 (fraction ranked first), median_rank, chance (1 / candidates),
    n_trials, n_candidates and ranks (per trial, 1 = best; a tie counts against the true video).
    """
    ids = sorted(candidates)
    ranks = []
    for t in trials:
        if t.stimulus not in candidates:
            continue
        d = np.array([matching_distance(t.arrays["mu_x"], t.arrays["logvar_x"], *candidates[s]) for s in ids])
        true = d[ids.index(t.stimulus)]
        ranks.append(int(1 + np.sum(np.delete(d, ids.index(t.stimulus)) <= true)))
    ranks = np.array(ranks, dtype=np.int64)
    nan = float("nan")
    return {"top1": float(np.mean(ranks == 1)) if len(ranks) else nan,
            "median_rank": float(np.median(ranks)) if len(ranks) else nan,
            "chance": 1.0 / len(ids) if ids else nan, "n_trials": len(ranks), "n_candidates": len(ids),
            "ranks": ranks.tolist()}


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

def cohens_d(paired: np.ndarray, unpaired: np.ndarray) -> float:
    """(mean paired - mean unpaired) / pooled standard deviation (ddof 1); NaN if undefined."""
    n1, n2 = len(paired), len(unpaired)
    if n1 < 2 or n2 < 2:
        return float("nan")
    pooled_var = ((n1 - 1) * np.var(paired, ddof=1) + (n2 - 1) * np.var(unpaired, ddof=1)) / (n1 + n2 - 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float((np.mean(paired) - np.mean(unpaired)) / np.sqrt(pooled_var))


def permutation_p(null: np.ndarray) -> float:
    """One-sided p of null[0] (observed) against null[1:]: (1 + #{null >= observed}) / (1 + #finite)."""
    rest = null[1:][np.isfinite(null[1:])]
    if not np.isfinite(null[0]) or len(rest) == 0:
        return float("nan")
    return float((1 + np.sum(rest >= null[0])) / (1 + len(rest)))


def summarise(c: Comparison) -> dict:
    """paired_mean, unpaired_mean, cohens_d, perm_p, t_p, mwu_p, n_paired, n_unpaired, n_stimuli (NaN if
    undefined)."""
    p, u = c.paired.astype(np.float64), c.unpaired.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        null = c.perm_sum / c.perm_n - (c.total_sum - c.perm_sum) / (c.total_n - c.perm_n)
    nan = float("nan")
    t_p = mwu_p = nan
    if len(p) >= 2 and len(u) >= 2:
        t_p = float(sps.ttest_ind(p, u, equal_var=False, alternative="greater").pvalue)
    if len(p) and len(u):
        mwu_p = float(sps.mannwhitneyu(p, u, alternative="greater").pvalue)
    return {"paired_mean": float(p.mean()) if len(p) else nan,
            "unpaired_mean": float(u.mean()) if len(u) else nan,
            "cohens_d": cohens_d(p, u), "perm_p": permutation_p(null), "t_p": t_p, "mwu_p": mwu_p,
            "n_paired": len(p), "n_unpaired": len(u), "n_stimuli": c.n_stimuli}


def result(comparisons: dict[str, dict[str, Comparison]]) -> dict:
    """JSON entry: centred pooled summary at the top, "blocks", and the same under "raw"."""
    def one(kind: dict[str, Comparison]) -> dict:
        return {**summarise(kind["pooled"]), "blocks": {b: summarise(kind[b]) for b in BLOCKS}}
    return {**one(comparisons["centred"]), "raw": one(comparisons["raw"])}


def two_way_anova(cells: list[list[np.ndarray]], names: tuple[str, str]) -> dict:
    """Two-way ANOVA with interaction, type II sums of squares, for an unbalanced design.

    cells[i][j]: (n_ij,) values at level i of factor names[0] and level j of names[1]. Fitted on cell
    counts, means and within-cell sums of squares: for a model that is constant within cells, the
    residual sum of squares is the within-cell one plus the count-weighted misfit of the cell means.
    """
    n_levels_a, n_levels_b = len(cells), len(cells[0])
    flat = [np.asarray(cells[i][j], np.float64) for i in range(n_levels_a) for j in range(n_levels_b)]
    n = np.array([len(v) for v in flat])
    keep = n > 0
    mean = np.array([v.mean() if len(v) else 0.0 for v in flat])
    within_ss = sum(float(((v - v.mean()) ** 2).sum()) for v in flat if len(v))
    level_a, level_b = np.divmod(np.arange(len(flat)), n_levels_b)
    dummies_a = (level_a[:, None] == np.arange(1, n_levels_a)).astype(float)
    dummies_b = (level_b[:, None] == np.arange(1, n_levels_b)).astype(float)
    interaction = (dummies_a[:, :, None] * dummies_b[:, None, :]).reshape(len(flat), -1)

    def fit(*terms: np.ndarray) -> tuple[float, int]:
        x = np.hstack([np.ones((len(flat), 1)), *terms])[keep]
        w = np.sqrt(n[keep])
        beta = np.linalg.lstsq(x * w[:, None], mean[keep] * w, rcond=None)[0]
        return within_ss + float((n[keep] * (mean[keep] - x @ beta) ** 2).sum()), np.linalg.matrix_rank(x)

    rss_full, rank_full = fit(dummies_a, dummies_b, interaction)
    rss_ab, rank_ab = fit(dummies_a, dummies_b)
    rss_a, rank_a = fit(dummies_a)
    rss_b, rank_b = fit(dummies_b)
    df_resid = int(n.sum()) - rank_full
    effects = {}
    for name, ss, df in ((names[0], rss_b - rss_ab, rank_ab - rank_b),
                         (names[1], rss_a - rss_ab, rank_ab - rank_a),
                         (f"{names[0]}:{names[1]}", rss_ab - rss_full, rank_full - rank_ab)):
        f_value = (ss / df) / (rss_full / df_resid) if df > 0 and df_resid > 0 and rss_full > 0 else np.nan
        effects[name] = {"df": int(df), "ss": float(ss), "F": float(f_value),
                         "p": float(sps.f.sf(f_value, df, df_resid)) if np.isfinite(f_value) else np.nan}
    return {"model": f"r ~ {names[0]} * {names[1]}, type II sums of squares", "n": int(n.sum()),
            "effects": effects, "residual": {"df": df_resid, "ss": float(rss_full)},
            "note": "p assumes independent pairs (optimistic); verdicts use the permutation p"}


# ---------------------------------------------------------------------------------------------
# Reports, JSON, figures, files
# ---------------------------------------------------------------------------------------------

def jsonable(x):
    """Nested dicts/lists with NaN and inf turned into null and numpy scalars into Python ones."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def fmt(x, spec: str) -> str:
    """x formatted by spec, or "-" for None / NaN."""
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def table(rows: list[tuple[str, str, dict]], label: str) -> str:
    """Text table; rows: (label, block, summary dict)."""
    width = max([28, len(label)] + [len(name) for name, _, _ in rows])   # folder names are long
    head = (f"{label:<{width}} {'block':<7} {'n_stim':>6} {'n_paired':>8} {'n_unpaired':>10} {'paired_r':>8} "
            f"{'unpaired_r':>10} {'d':>7} {'perm_p':>8} {'t_p':>9} {'mwu_p':>9}")
    lines = [head, "-" * len(head)]
    for name, block, s in rows:
        lines.append(f"{name:<{width}} {block:<7} {s['n_stimuli']:>6} {s['n_paired']:>8} "
                     f"{s['n_unpaired']:>10} "
                     f"{fmt(s['paired_mean'], '.3f'):>8} {fmt(s['unpaired_mean'], '.3f'):>10} "
                     f"{fmt(s['cohens_d'], '.2f'):>7} {fmt(s['perm_p'], '.3g'):>8} "
                     f"{fmt(s['t_p'], '.2g'):>9} {fmt(s['mwu_p'], '.2g'):>9}")
    return "\n".join(lines)


def table_rows(name: str, entry: dict) -> list[tuple[str, str, dict]]:
    """Rows for one result() entry (or its "raw" part): pooled, then each block."""
    return [(name, "pooled", entry)] + [(name, b, entry["blocks"][b]) for b in BLOCKS]


def verdict(name: str, s: dict) -> str:
    """One line: the decision from the permutation p, with paired r next to d."""
    p = s["perm_p"]
    decided = p is not None and np.isfinite(p) and p < ALPHA
    what = "paired more similar than unpaired" if decided else "no evidence that paired are more similar"
    return (f"{name}: {what} (paired r = {fmt(s['paired_mean'], '.3f')} vs unpaired "
            f"{fmt(s['unpaired_mean'], '.3f')}, d = {fmt(s['cohens_d'], '.2f')}, perm p = {fmt(p, '.3g')}, "
            f"{s['n_stimuli']} stimuli)")


def method_lines(path: str, n_perm: int, seed: int) -> list[str]:
    """Report header: the input and how every number is defined."""
    return [f"file: {path}", f"permutations: {n_perm} (seed {seed}); verdicts: permutation p < {ALPHA}",
            *(f"{k}: {v}" for k, v in METHOD.items())]


def histogram_figure(panels: list[list[tuple[str, Comparison | None]]], title: str) -> bytes:
    """PNG of paired vs unpaired r histograms; panels[row][col] = (title, comparison or None for blank)."""
    from matplotlib.figure import Figure  # object API: no pyplot state; PNG is drawn by Agg

    n_rows, n_cols = len(panels), max(len(row) for row in panels)
    fig = Figure(figsize=(4.2 * n_cols, 3.2 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for row, ax_row in zip(panels, axes, strict=True):
        for ax, (name, c) in zip(ax_row, row + [("", None)] * (n_cols - len(row)), strict=True):
            if c is None or not len(c.paired) + len(c.unpaired):
                ax.axis("off")
                continue
            bins = np.linspace(-1, 1, 81)
            for values, label, colour in ((c.unpaired, "unpaired", "tab:gray"),
                                          (c.paired, "paired", "tab:red")):
                if len(values):
                    ax.hist(values, bins, density=True, histtype="stepfilled", alpha=0.5, color=colour,
                            label=f"{label} (n={len(values)}, mean {values.mean():.3f})")
                    ax.axvline(values.mean(), color=colour, lw=1)
            ax.set_title(f"{name}\nd = {fmt(cohens_d(c.paired, c.unpaired), '.2f')}", fontsize=9)
            ax.set_xlabel("Pearson r")
            ax.legend(fontsize=7)
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def learning_curve_figure(records: list[dict], title: str) -> bytes:
    """PNG of a run's metrics.jsonl against step: the stimulus -> neural correlation with its anchors
    (repeat ceiling, pixel ridge), cross-modal d, zero-shot d per held-out pair, and the collapse alarms
    (training Poisson over its floor, raw latent correlation)."""
    from matplotlib.figure import Figure

    val = [(r["step"], r["val"]) for r in records if "val" in r]
    train = [r for r in records if "val" not in r and r.get("poisson_floor")]

    def series(get):
        points = [(step, get(v)) for step, v in val]
        points = [(x, y) for x, y in points if y is not None and np.isfinite(y)]
        return ([x for x, _ in points], [y for _, y in points]) if points else ([], [])

    fig = Figure(figsize=(13, 3.4), layout="constrained")
    ax = fig.subplots(1, 4)
    ax[0].plot(*series(lambda v: v.get("corr_train_animals")), "o-", label="PNBA, stimulus path")
    ax[0].plot(*series(lambda v: v.get("corr_fused")), "s--", label="PNBA, fused")
    for key, style, label in (("ceiling", ":", "repeat ceiling"), ("ridge_corr", "-.", "pixel ridge")):
        xs, ys = series(lambda v, key=key: v.get(key))
        if ys:
            ax[0].axhline(ys[-1], ls=style, color="gray", label=f"{label} {ys[-1]:.2f}")
    ax[0].set_title("stimulus -> neural, oracle trials")
    ax[0].set_ylabel("single-trial r")
    for group in ("train", "heldout"):
        ax[1].plot(*series(lambda v, g=group: (v.get(f"crossmodal_{g}") or {}).get("d")), "o-",
                   label=f"{group} animals")
    ax[1].set_title("cross-modal, centred d")
    pairs = sorted({(z["a"], z["b"]) for _, v in val for z in v.get("zeroshot", [])})
    for a, b in pairs:
        ax[2].plot(*series(lambda v, a=a, b=b: next((z["d"] for z in v.get("zeroshot", [])
                                                     if (z["a"], z["b"]) == (a, b)), None)),
                   "o-", label=f"{a[:12]} x {b[:12]}")
    ax[2].set_title("zero-shot, held-out pairs, centred d")
    steps = [r["step"] for r in train]
    ax[3].plot(steps, [r["poisson"] / r["poisson_floor"] for r in train], label="Poisson / floor (train)")
    ax[3].plot(steps, [r["latent_corr"] for r in train], label="latent_corr (train)")
    ax[3].axhline(1.0, color="gray", lw=0.5)
    ax[3].set_title("collapse alarms")
    for a in ax:
        a.set_xlabel("step")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def matrix_figure(panels: list[tuple[str, np.ndarray]], row_labels: np.ndarray, col_labels: np.ndarray,
                  title: str) -> bytes:
    """PNG of correlation matrices (rows, cols) side by side, with lines between stimulus groups."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(panels), 4.6), layout="constrained")
    for ax, (name, r) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        image = ax.imshow(r, cmap="RdBu_r", vmin=-np.nanmax(np.abs(r)), vmax=np.nanmax(np.abs(r)))
        for k in np.flatnonzero(np.diff(row_labels)):
            ax.axhline(k + 0.5, color="k", lw=0.3)
        for k in np.flatnonzero(np.diff(col_labels)):
            ax.axvline(k + 0.5, color="k", lw=0.3)
        ax.set_title(name, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8, label="r")
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def write_outputs(folder: str, files: dict[str, bytes]) -> None:
    """Write every file through config.atomic_path, renaming none until all are written: no half-written
    output."""
    os.makedirs(folder, exist_ok=True)
    with contextlib.ExitStack() as stack:
        for name, content in files.items():
            with open(stack.enter_context(config.atomic_path(os.path.join(folder, name))), "wb") as f:
                f.write(content)


def json_bytes(obj) -> bytes:
    return (json.dumps(jsonable(obj), indent=1, allow_nan=False) + "\n").encode()


def run_cli(doc: str, argv: list[str] | None, analyse: Callable[[list, str, int, int], dict[str, bytes]],
            read: Callable, read_errors: tuple[type[Exception], ...] = (),
            parents: tuple[argparse.ArgumentParser, ...] = (), epilog: str | None = None) -> int:
    """Shared CLI: parse [reps.h5] [--out DIR] [--permutations N] [--seed S], check the output folder is
    writable, read and check the trials with `read`, run analyse(trials, path, n_perm, seed) -> {file
    name: content}, write the files. parents: argparse parents (add_help=False) whose options the script
    parses itself, so that --help lists them too; epilog: the end of --help (an "example:" line).

    A StatsError, a config.ConfigError (a `--section.field` key: none applies, the representations file
    fixes them; an output folder that cannot be written) or one of `read_errors` (the reader's own) becomes
    one stderr line and exit 2.
    """
    parser = argparse.ArgumentParser(description=doc, epilog=epilog, parents=list(parents),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reps", nargs="?", help="representations file written by extract.py "
                                                "(default: newest runs/*/reps.h5)")
    parser.add_argument("--out", help="output folder (default: the folder of the representations file)")
    parser.add_argument("--permutations", type=int, default=1000, help="stimulus relabellings (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the permutations (default 0)")
    try:
        _, argv = config.parse_overrides(config.Config(), sys.argv[1:] if argv is None else argv, allowed=())
        args = parser.parse_args(argv)
        if args.permutations < 1:
            parser.error("--permutations must be at least 1")
        path = args.reps or default_reps_path()
        out = args.out or os.path.dirname(os.path.abspath(path))
        config.check_writable(out)
        files = analyse(load(path, read), path, args.permutations, args.seed)
        write_outputs(out, files)
    except (StatsError, config.ConfigError, *read_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
