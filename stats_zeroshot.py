"""python stats_zeroshot.py [reps.h5] [--out DIR] [--permutations 1000] [--seed 0]
    [--baselines pca_cca,cebra,pca,stimulus] [--data DIR ...] [--pcs 8] [--splits 5] [--log1p]
    [--cebra-iterations 2000]
python stats_zeroshot.py runs/demo/reps.h5 --out results/
python stats_zeroshot.py runs/demo/reps.h5 --baselines pca_cca,cebra,pca,stimulus

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
pca (each animal's own PCs, unaligned: the floor) and stimulus (video PCs: the ceiling). They read the
responses and videos of the trials in the representations file from the data folders its config names
(or --data DIR ..., after reps.h5), opened as that config says; --pcs components (default 8), --log1p
before the neural PCA, --cebra-iterations training steps per split (CPU: about 0.1-0.3 s each).
Adds "baselines" to zeroshot.json, a table (also printed) and per-block tables to zeroshot.txt, and
zeroshot_baselines.png (one column per method, same axes as zeroshot_blocks.png).
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np

import baselines
import config
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


def analyse(trials: list, path: str, n_perm: int, seed: int, options: dict | None = None) -> dict[str, bytes]:
    """Read the representations, compare, and render {file name: content}. options: the baselines to run
    beside PNBA (see baseline_section), or None."""
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
    files = {"zeroshot_blocks.png": stats.histogram_figure(panels, "same stimulus (paired) vs other pairs"),
             "zeroshot_matrix.png": matrix_figure(animals[a], animals[b], f"{names[0]}, trials by stimulus",
                                                  np.random.default_rng(seed))}
    if baseline:
        out["baselines"], summary, detail, files["zeroshot_baselines.png"] = baseline_section(
            animals, sessions, pairs, entries, centred, n_perm, seed, options)
        lines += ["", *summary, "", *detail]
        print("\n".join(summary))
    text = ("\n".join(lines) + "\n").encode()
    return {"zeroshot.json": stats.json_bytes(out), "zeroshot.txt": text, **files}


# ---------------------------------------------------------------------------------------------
# Baselines beside PNBA (--baselines): same pairs, same trials, same statistics
# ---------------------------------------------------------------------------------------------

PNBA_FITS = "PNBA encoder (mu_x) trained on the training animals; zero-shot for pairs of held-out animals"


def short_names(names) -> dict[str, str]:
    """Animal folder names without their '-Video-<hash>' suffix, where the short names stay distinct."""
    short = {n: n.split("-Video-")[0] for n in names}
    return short if len(set(short.values())) == len(short) else {n: n for n in names}


def open_sessions(animals: dict[str, list], path: str, options: dict) -> dict[str, baselines.Session]:
    """A baselines.Session per analysed animal: its trials of the representations file, read from the data
    folders named by the file's config (or options["data"]), opened as that config's data section says."""
    attrs = options.get("attrs") or {}
    try:
        cfg = config.from_dict(json.loads(attrs["config"])).data if "config" in attrs else config.DataConfig()
    except (json.JSONDecodeError, TypeError, AttributeError, config.ConfigError) as e:
        raise stats.StatsError(f"{path}: unreadable config attribute ({type(e).__name__}: {e}); "
                               "the baselines need its data section") from None
    paths = list(options.get("data") or cfg.paths)
    if not paths:
        raise stats.StatsError(f"{path}: names no data folders (no config with data.paths); the baselines "
                               "read responses and videos from them: pass --data")
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
    parser = argparse.ArgumentParser(add_help=False)      # the baseline options; run_cli parses the rest
    parser.add_argument("--baselines", default="")
    parser.add_argument("--data", nargs="+", default=None)
    parser.add_argument("--pcs", type=int, default=baselines.PCS)
    parser.add_argument("--splits", type=int, default=baselines.SPLITS)
    parser.add_argument("--log1p", action="store_true")
    parser.add_argument("--cebra-iterations", type=int, default=baselines.CEBRA_PARAMS["max_iterations"])
    options, rest = parser.parse_known_args(argv)
    names = [n for n in options.baselines.split(",") if n]
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
        return analyse(trials, path, n_perm, seed, {**vars(options), "names": names, "attrs": attrs})

    return stats.run_cli(__doc__, rest, run, read, (data.DataError, config.ConfigError))


if __name__ == "__main__":
    raise SystemExit(main())
