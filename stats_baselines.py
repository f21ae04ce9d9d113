"""python stats_baselines.py [reps.h5] [--data DIR ...] [--baselines pca_cca,cebra,pca,stimulus,summary|none]
    [--pcs 8] [--splits 5] [--log1p] [--cebra-iterations 2000] [--control SUBJECT,...] [--out DIR]
    [--permutations 1000] [--seed 0]
python stats_baselines.py runs/demo/reps.h5 --baselines pca,summary
python stats_baselines.py runs/monkey/reps.h5 --control T --data data_synth/monkey

What PNBA is measured against, on the trials of the representations file, read from the recordings it was
extracted from: the data folders its config names (or --data DIR ..., after reps.h5: Sensorium mouse
folders, .nwb files, or folders holding either), opened as that config's data section says. The stats
scripts read reps.h5 alone; everything that needs the recordings is here.

- Alignment baselines beside PNBA (baselines.py), on the same pairs of animals with the same statistics:
  PNBA's numbers come from stats_zeroshot.pair_statistics with the same seed (the "pairs" of zeroshot.json).
  pca_cca (per-animal PCA + CCA fitted on a random half of the stimuli, scored on the other trials, --splits
  halves), cebra (multi-session CEBRA-Behavior with stimulus PCs as labels, same halves; optional package:
  one "skipped" line without it), pca (each animal's own PCs, unaligned: the floor), stimulus (the video's
  PCs, or the behaviour's: the ceiling) and summary (mean, sd and quantiles over each animal's z-scored
  neurons per frame: identity-free, nothing fitted). --baselines picks them (default all; none: only the
  rates ridge), --pcs components (default 8), --log1p before the neural PCA, --cebra-iterations training
  steps per split (CPU: about 0.1-0.3 s each). With pca_cca or cebra, PNBA's mu_x is also scored on the
  fitted baselines' held-out trials of the same splits ("reference", pnba@splits in the tables).
- Rates ridge (the trials carry "behaviour": NWB reaching): the classic within-animal decoder
  (decoding.rates_baseline: the one cross-validated ridge on smoothed, lagged spike counts) of every held-out
  non-control session (--control names the controls), on its trials of the representations file, beside
  the zero-shot linear decoder's R² on the same sessions (stats_zeroshot.zero_shot_decoding: the number in
  zeroshot.json) and their ratio, whose target is RATES_TARGET.

Writes baselines.json ({file, permutations, seed, method, recordings, pairs (PNBA), baselines (settings,
methods: per method its pairs, as pairs), rates_ridge, zero_shot_linear, linear_over_rates}),
baselines.txt (the tables; the summaries are also printed) and zeroshot_baselines.png (one column per
method, the axes of zeroshot_blocks.png), by default beside the representations file. Data that cannot be
read, an animal missing from it, or a trial whose tier or length changed since extraction: one error line,
exit 2, nothing written.
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass

import numpy as np

import baselines
import config
import data
import decoding
import stats
import stats_zeroshot
from data import Animal, BehaviourAnimal, TrialRep

PNBA_FITS = "PNBA encoder (mu_x) trained on the training animals; zero-shot for pairs of held-out animals"
RATES_TARGET = 0.8        # zero-shot linear R² should reach this fraction of the within-animal rates ridge
RATES_METHOD = (f"within-animal ridge (decoding.fit_ridge) from Gaussian-smoothed spike counts (sd "
                f"{decoding.SMOOTH_BINS} bins, {decoding.HISTORY} lagged bins) to the behaviour, "
                f"{decoding.FOLDS}-fold over each held-out session's trials of the representations file; NaN "
                "counts (unit not observed) imputed with the unit's mean over the observed bins of the "
                "fitting fold")


@dataclass(frozen=True)
class BaselineSettings:
    """What the alignment baselines run (baselines.zeroshot): methods (names in baselines.BASELINES), PCs,
    random halves of the stimuli for the fitted ones, log1p before the neural PCA, CEBRA steps per split."""

    methods: tuple[str, ...] = baselines.BASELINES
    pcs: int = baselines.PCS
    splits: int = baselines.SPLITS
    log1p: bool = False
    cebra_iterations: int = baselines.CEBRA_PARAMS["max_iterations"]


# ---------------------------------------------------------------------------------------------
# The recordings behind a representations file
# ---------------------------------------------------------------------------------------------

def data_section(path: str, data_paths: list[str] | None) -> tuple[config.DataConfig, list[str]]:
    """The data section of the representations file's config (how its recordings were opened) and the folders
    to read: data_paths (--data) if given, else the config's; StatsError when there are none."""
    attrs = data.read_attributes(path)
    try:
        cfg = config.from_dict(json.loads(attrs["config"])).data if "config" in attrs else config.DataConfig()
    except (json.JSONDecodeError, TypeError, AttributeError, config.ConfigError) as e:
        raise stats.StatsError(f"{path}: unreadable config attribute ({type(e).__name__}: {e}); the "
                               "baselines read the data folders its data section names") from None
    paths = list(data_paths or cfg.paths)
    if not paths:
        raise stats.StatsError(f"{path}: names no data folders (no config with data.paths); the baselines "
                               "read the recordings: pass --data")
    return cfg, paths


def open_recordings(animals: dict[str, list[TrialRep]], path: str,
                    data_paths: list[str] | None) -> dict[str, Animal]:
    """The recording of every analysed animal, each of its trials checked against the representations
    (baselines.check_trials); StatsError or DataError (one line) when they cannot be read or disagree."""
    cfg, paths = data_section(path, data_paths)
    try:
        found = {a.name: a for a in data.mice_from_config(cfg, paths)}
    except data.DataError as e:
        raise stats.StatsError(f"{path}: the recordings it was extracted from cannot be read ({e}); pass "
                               "their folders with --data") from None
    missing = [m for m in animals if m not in found]
    if missing:
        raise stats.StatsError(f"{path}: animal {missing[0]} is not in the data folders {', '.join(paths)} "
                               f"({len(missing)} missing); pass the folders it came from with --data")
    for m, trials in animals.items():
        baselines.check_trials(found[m], trials)
    return {m: found[m] for m in animals}


def spike_counts(recordings: dict[str, Animal], animals: dict[str, list[TrialRep]]) -> dict[str, list]:
    """{animal: its trials' spike counts (T, N), NaN where a unit was not recorded}
    (BehaviourAnimal.spike_counts); StatsError for a recording that has none."""
    out = {}
    for m, trials in animals.items():
        recording = recordings[m]
        if not isinstance(recording, BehaviourAnimal):
            raise stats.StatsError(f"{recording.path}: a {recording.stimulus_kind} recording has no spike "
                                   f"counts, but the representations of {m} carry behaviour")
        out[m] = [recording.spike_counts(t.trial) for t in trials]
    return out


# ---------------------------------------------------------------------------------------------
# Alignment baselines beside PNBA: same pairs, same trials, same statistics
# ---------------------------------------------------------------------------------------------

def short_names(names) -> dict[str, str]:
    """Animal folder names without their '-Video-<hash>' suffix, where the short names stay distinct."""
    short = {n: n.split("-Video-")[0] for n in names}
    return short if len(set(short.values())) == len(short) else {n: n for n in names}


def _row(name: str, width: int, method: str, zero: str, r: dict) -> str:
    """One line of the baseline table: a stats.result() entry (averaged ones carry "sd")."""
    if "paired_mean" not in r:
        return f"{name:<{width}} {method:<11} {zero:<9} {r.get('skipped') or 'not scored'}"
    sd = (r.get("sd") or {}).get("cohens_d")
    return (f"{name:<{width}} {method:<11} {zero:<9} {stats.fmt(r['paired_mean'], '.3f'):>8} "
            f"{stats.fmt(r['unpaired_mean'], '.3f'):>10} {stats.fmt(r['cohens_d'], '.2f'):>7} "
            f"{stats.fmt(sd, '.2f'):>6} {stats.fmt(r['perm_p'], '.3g'):>7} "
            f"{stats.fmt(r['n_paired'], '.0f'):>8}")


def _label(method: str) -> str:
    return "pnba@splits" if method == "reference" else method


def baseline_section(animals: dict[str, list[TrialRep]], recordings: dict[str, Animal],
                     pairs: list[tuple[str, str]], entries: list[dict],
                     comparisons: dict[tuple[str, str], dict], settings: BaselineSettings, n_perm: int,
                     seed: int) -> tuple[dict, list[str], list[str], bytes]:
    """The baselines of settings on the recordings of the pairs of PNBA's analysis (entries, comparisons:
    stats_zeroshot.pair_statistics, in the order of pairs). Returns (JSON entry: baselines.zeroshot's,
    summary lines, per-block lines, figure)."""
    sessions = {m: baselines.animal_session(recordings[m], ts) for m, ts in animals.items()}
    fitted = {"pca_cca", "cebra"} & set(settings.methods)
    result = baselines.zeroshot(sessions, pairs, list(settings.methods), n_perm, seed, settings.pcs,
                                settings.log1p, settings.splits,
                                stats_zeroshot.per_animal(animals, "mu_x") if fitted else None,
                                settings.cebra_iterations)
    per_method = {"pnba": [c["centred"] for c in comparisons.values()], **result.pop("comparisons")}
    summary, detail = baseline_lines(result, entries, short_names(animals))
    return result, summary, detail, baseline_figure(result["methods"], per_method, entries)


def baseline_lines(result: dict, entries: list[dict], short: dict[str, str]) -> tuple[list[str], list[str]]:
    """(summary: what each method fits and the table of PNBA and every method per pair, with wall times;
    detail: the per-block table) of baselines.zeroshot's result beside PNBA's entries."""
    methods = result["methods"]
    names = [f"{short[e['a']]} x {short[e['b']]}" + (" (held-out)" if e["heldout"] else "") for e in entries]
    width = max(len(n) for n in [*names, "pair"])
    head = (f"{'pair':<{width}} {'method':<11} {'zero-shot':<9} {'paired_r':>8} {'unpaired_r':>10} {'d':>7} "
            f"{'sd(d)':>6} {'perm_p':>7} {'n_paired':>8}")
    summary = ["== baselines beside PNBA: centred r, pooled over blocks (fitted methods: mean over splits, "
               "sd(d) over splits)", f"{'pnba':<11} {PNBA_FITS}"]
    summary += [f"{_label(m):<11} {e['fits']}" for m, e in methods.items()]
    summary += [e["skipped"] for e in methods.values() if e["skipped"]]
    summary += ["", head, "-" * len(head)]
    block_rows = []
    for p, (name, e) in enumerate(zip(names, entries, strict=True)):
        zero = "yes" if e["heldout"] else "no"
        summary.append(_row(name, width, "pnba", zero, e))
        for m, me in methods.items():
            if not me["skipped"]:
                summary.append(_row(name, width, _label(m), zero if m == "reference" else me["zero_shot"],
                                    me["pairs"][p]))
                if "paired_mean" in me["pairs"][p]:
                    block_rows += stats.table_rows(f"{name}, {_label(m)}", me["pairs"][p])
    seconds = [f"reading the recordings {result['seconds']['read']:.1f} s (shared)"]
    seconds += [f"{_label(m)} {e['wall_s']:.1f} s" for m, e in methods.items()]
    summary += ["", "wall time: " + "; ".join(seconds)]
    if result["cebra_version"]:
        summary.append(f"cebra version: {result['cebra_version']}")
    detail = ["== baselines per block (centred; fitted methods: mean over splits)",
              stats.table(block_rows, "pair, method") if block_rows else "no baseline was scored"]
    return summary, detail


def baseline_figure(methods: dict[str, dict], per_method: dict[str, list], entries: list[dict]) -> bytes:
    """Centred paired vs unpaired r pooled over pairs: one row per group of pairs (held-out, other), one
    column per method scored (per_method: PNBA's and baselines.zeroshot's centred comparisons per pair)."""
    panels = []
    for group, keep in (("held-out pairs", True), ("other pairs", False)):
        if not any(e["heldout"] == keep for e in entries):
            continue
        row = []
        for m, cs in per_method.items():
            if m in methods and methods[m]["skipped"]:
                continue                                     # a skipped method gets no column
            cs = [c for c, e in zip(cs, entries, strict=True) if c is not None and e["heldout"] == keep]
            row.append((f"{_label(m)}, {group}", stats.pool(cs)["pooled"] if cs else None))
        panels.append(row)
    title = "PNBA and baselines, centred: same stimulus (paired) vs other pairs (fitted ones: first split)"
    return stats.histogram_figure(panels, title)


# ---------------------------------------------------------------------------------------------
# The rates ridge: the classic within-animal decoder on spike counts
# ---------------------------------------------------------------------------------------------

def rates_section(animals: dict[str, list[TrialRep]], role: dict[str, str], counts: dict[str, list],
                  seed: int) -> tuple[dict, list[str]]:
    """The rates ridge (decoding.rates_baseline) from every held-out non-control animal's spike counts
    (counts: spike_counts) to its behaviour in the representations file, beside the zero-shot linear
    decoder's R² on the same animals. Returns ({rates_ridge, zero_shot_linear, linear_over_rates}, lines)."""
    title = "== rates ridge: the classic within-animal decoder, spike counts -> behaviour (R², mean over " \
            "components)"
    heldout = [m for m in animals if role[m] == "heldout"]
    if not heldout:
        reason = "rates ridge skipped: no held-out non-control animal"
        return {"rates_ridge": {"skipped": reason}}, [title, reason]
    behaviour = stats_zeroshot.per_animal({m: animals[m] for m in heldout}, "behaviour")
    labels = {m: [t.stimulus for t in animals[m]] for m in heldout}
    rates = {"method": RATES_METHOD, **decoding.rates_baseline({m: counts[m] for m in heldout}, behaviour,
                                                                labels, seed)}
    out = {"rates_ridge": rates}
    lines = [title, RATES_METHOD]
    lines += [f"  {m}: R² {stats.fmt(e['mean'], '.3f')} ({e['n_trials']} trials; alpha per fold "
              f"{', '.join(f'{a:.3g}' for a in e['alphas'])})" for m, e in rates["animals"].items()]
    lines.append(f"  pooled: R² {stats.fmt(rates['pooled']['mean'], '.3f')}")
    skipped = stats_zeroshot.decoding_skipped(animals, role)
    if skipped:
        return out, [*lines, f"zero-shot linear / rates ridge: {skipped}"]
    zero = stats_zeroshot.zero_shot_decoding(animals, role, {"heldout": heldout}, seed, decoders=("linear",))
    out["zero_shot_linear"] = zero["linear"]["groups"]["heldout"]["mean"]
    out["linear_over_rates"] = stats.ratio(out["zero_shot_linear"], rates["pooled"]["mean"])
    return out, [*lines, f"zero-shot linear decoder from mu_x (zeroshot.json): R² "
                         f"{stats.fmt(out['zero_shot_linear'], '.3f')}; zero-shot linear / rates ridge = "
                         f"{stats.fmt(out['linear_over_rates'], '.2f')} (target >= {RATES_TARGET})"]


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

def analyse(trials: list[TrialRep], path: str, n_perm: int, seed: int,
            settings: BaselineSettings = BaselineSettings(), data_paths: list[str] | None = None,
            controls=()) -> dict[str, bytes]:
    """Baselines beside PNBA for a representations file's trials -> {file name: content}. settings: the
    alignment baselines (no methods: none); data_paths: the recordings' folders (default: the file's
    config's); controls: negative-control subjects (left out of the rates ridge)."""
    animals = stats_zeroshot.analysed_animals(trials)
    pairs = stats_zeroshot.animal_pairs(animals, path)
    role = stats_zeroshot.roles(animals, controls, path)
    behaviour = stats_zeroshot.has_behaviour(animals)
    if not settings.methods and not behaviour:
        raise stats.StatsError(f"{path}: nothing to compute: --baselines none, and no behaviour for the "
                               "rates ridge")
    recordings = open_recordings(animals, path, data_paths)           # every read checked before the work
    counts = spike_counts(recordings, {m: ts for m, ts in animals.items() if role[m] == "heldout"}) \
        if behaviour else {}
    entries, comparisons = stats_zeroshot.pair_statistics(animals, pairs, n_perm, np.random.default_rng(seed))
    out = {"file": path, "permutations": n_perm, "seed": seed, "method": stats.METHOD,
           "recordings": {m: r.path for m, r in recordings.items()}, "pairs": entries}
    lines = ["Baselines beside PNBA, on the recordings of the representations file's trials",
             *stats.method_lines(path, n_perm, seed)]
    files = {}
    if settings.methods:
        out["baselines"], summary, detail, files["zeroshot_baselines.png"] = baseline_section(
            animals, recordings, pairs, entries, comparisons, settings, n_perm, seed)
        lines += ["", *summary, "", *detail]
        print("\n".join(summary))
    if behaviour:
        rates, summary = rates_section(animals, role, counts, seed)
        out.update(rates)
        lines += ["", *summary]
        print("\n".join(summary))
    text = ("\n".join(lines) + "\n").encode()
    return {"baselines.json": stats.json_bytes(out), "baselines.txt": text, **files}


def _methods(text: str) -> tuple[str, ...]:
    """--baselines: comma-separated names of baselines.BASELINES, or none."""
    names = tuple(n for n in text.split(",") if n and n != "none")
    unknown = [n for n in names if n not in baselines.BASELINES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; valid: "
                                         f"{','.join(baselines.BASELINES)} or none")
    return names


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def options_parser() -> argparse.ArgumentParser:
    """The options of this stage beside stats.run_cli's (an argparse parent: add_help=False)."""
    parser = argparse.ArgumentParser(add_help=False, parents=[stats_zeroshot.control_parser()])
    parser.add_argument("--baselines", type=_methods, default=baselines.BASELINES, metavar="NAME,...",
                        help="comma-separated alignment baselines beside PNBA: "
                             f"{','.join(baselines.BASELINES)}, or none (default: all)")
    parser.add_argument("--data", nargs="+", default=None, metavar="DIR",
                        help="Sensorium mouse folders or a folder holding them, or .nwb files or folders "
                             "holding them (default: the data the file's config names)")
    parser.add_argument("--pcs", type=_at_least_one, default=baselines.PCS,
                        help=f"components of the baselines (default {baselines.PCS})")
    parser.add_argument("--splits", type=_at_least_one, default=baselines.SPLITS,
                        help=f"random halves of the stimuli for pca_cca, cebra (default {baselines.SPLITS})")
    parser.add_argument("--log1p", action="store_true", help="log1p the responses before the neural PCA")
    steps = baselines.CEBRA_PARAMS["max_iterations"]
    parser.add_argument("--cebra-iterations", type=_at_least_one, default=steps,
                        help=f"CEBRA training steps per split (default {steps})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = options_parser()
    options, rest = parser.parse_known_args(argv)
    settings = BaselineSettings(options.baselines, options.pcs, options.splits, options.log1p,
                                options.cebra_iterations)
    run = functools.partial(analyse, settings=settings, data_paths=options.data, controls=options.control)
    return stats.run_cli(__doc__, rest, run, data.read_representations, (data.DataError, config.ConfigError),
                         parents=(parser,), epilog="example: python stats_baselines.py runs/RUN/reps.h5 "
                                                   "--baselines pca,summary --data data_synth/demo")


if __name__ == "__main__":
    raise SystemExit(main())
