"""Encode whole trials with a trained PNBA and score it: the one path that validation during training
(train.py) and extraction (extract.py) share, so that the numbers printed while training and the latents
in reps.h5 come from the same code.

    from evaluate import encode_trials, validate     # library module: no command line

A trial is encoded as consecutive windows of the training length (data.eval_windows); windows of several
trials go through the model together, CHUNK at a time, and a video shown in several trials is encoded once.
With mean_norm "batch" each animal's neural means are standardised with its own statistics over
statistics_trials(animal): all its trials with responses, or an evenly spaced STATS_TRIALS of them, so a
trial's latents never depend on which other trials are encoded with it.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

import baselines
import data
import pnba
import stats
from data import Animal

CHUNK = 64               # windows per forward pass (eval-mode outputs do not depend on the other windows)
STATS_TRIALS = 256       # at most this many trials per animal in its neural statistics
VAL_TRAIN_TRIALS = 16    # train-tier trials per animal in validation's alignment metrics (most shared videos)
VAL_PERMUTATIONS = 200   # stimulus permutations per validation test (the stats scripts use 1000)


# ------------------------------------------------------------------------------------------------
# whole trials
# ------------------------------------------------------------------------------------------------

def statistics_trials(animal: Animal) -> list[int]:
    """The trials whose responses make an animal's neural statistics: every trial with responses, or
    STATS_TRIALS of them evenly spaced (the statistics are means over thousands of windows)."""
    trials = [int(i) for i in animal.trials(None, hidden=False)]
    if len(trials) <= STATS_TRIALS:
        return trials
    return [trials[k] for k in np.linspace(0, len(trials) - 1, STATS_TRIALS).round().astype(int)]


def _window_groups(animal: Animal, trials: Iterable[int], frames: int, reads_state: bool) -> Iterator[list]:
    """data.eval_windows of each trial, in groups of consecutive trials of about CHUNK windows."""
    group, size = [], 0
    for i in trials:
        w = data.eval_windows(animal, i, frames, reads_state)
        group.append(w)
        size += len(w["responses"])
        if size >= CHUNK:
            yield group
            group, size = [], 0
    if group:
        yield group


def _cat(windows: list[dict], key: str, device) -> torch.Tensor | None:
    if windows[0][key] is None:
        return None
    return torch.cat([w[key] for w in windows]).to(device)


def _chunked(fn: Callable, *inputs: torch.Tensor | None) -> list[torch.Tensor]:
    """fn over the inputs (each (W, ...) or None) CHUNK windows at a time; its outputs concatenated."""
    n = len(next(x for x in inputs if x is not None))
    parts = [fn(*(None if x is None else x[k:k + CHUNK] for x in inputs)) for k in range(0, n, CHUNK)]
    return [torch.cat(p) for p in zip(*parts, strict=True)]


@torch.no_grad()
def animal_statistics(model: pnba.PNBA, animal: Animal, frames: int, device, identity: bool = True):
    """The animal's neural statistics (PNBA.neural_statistics) over statistics_trials(animal), each trial
    read once; identity False: without its unit embeddings (the identity-free path). None without
    mean_norm "batch"."""
    if model.cfg.mean_norm != "batch":
        return None
    groups = _window_groups(animal, statistics_trials(animal), frames, model.cfg.state_input != "none")
    batches = ((_cat(g, "responses", device), _cat(g, "state", device)) for g in groups)
    responses, states = itertools.tee(batches)         # read in lockstep: one group held at a time
    return model.neural_statistics((r for r, _ in responses), coords=animal.coords_tensor(device),
                                   states=(s for _, s in states), animal=animal.name if identity else None)


@dataclass
class EncodedTrial:
    """One trial encoded: its windows (data.eval_windows), the window-level Gaussians (W, C, n, T) of both
    modalities and their fusion, and mu_x_free (W, C, n, T), a training animal's identity-free mu_x (or
    None)."""
    windows: dict
    gaussians: pnba.Gaussians
    mu_x_free: torch.Tensor | None = None

    @property
    def trial(self) -> int:
        return self.windows["trial"]

    def arrays(self) -> dict[str, np.ndarray]:
        """Per frame, as reps.h5 stores them: name -> (valid_frames, C * n) float32."""
        keep = self.windows["keep"].reshape(-1)
        out = {name: pnba.per_frame(getattr(self.gaussians, name), keep) for name in data.REPS_ARRAYS}
        if self.mu_x_free is not None:
            out["mu_x_free"] = pnba.per_frame(self.mu_x_free, keep)
        return out


def stimulus_key(animal: Animal, groups: dict) -> Callable[[int], Hashable] | None:
    """encode_trials' stimulus_key for an animal's trials: their video's group id (groups:
    data.stimulus_groups), so that a video is encoded once; a trial of unknown video (-1) is its own. None
    for behaviour, which is every trial's own."""
    if animal.stimulus_kind != "video":
        return None

    def key(i: int) -> Hashable:
        group = groups.get((animal.name, i), -1)
        return group if group >= 0 else (animal.name, i)
    return key


@torch.no_grad()
def encode_trials(model: pnba.PNBA, animal: Animal, trials: Iterable[int], frames: int, device, x_stats=None,
                  free_stats=None, stimulus_key: Callable[[int], Hashable] | None = None,
                  cache: dict | None = None) -> Iterator[EncodedTrial]:
    """Encode whole trials of one animal (means, no sampling), yielding an EncodedTrial per trial in order.

    x_stats: animal_statistics(model, animal, ...); free_stats: its identity-free statistics, given for a
    training animal of a model with unit embeddings: then mu_x_free too. stimulus_key(trial): trials with
    the same key show the same stimulus, whose encoding is then computed once and kept in `cache` (a dict,
    shareable across animals); None: every trial's stimulus is its own (behaviour)."""
    coords, name = animal.coords_tensor(device), animal.name
    cache = {} if cache is None else cache
    for group in _window_groups(animal, trials, frames, model.cfg.state_input != "none"):
        sizes = [len(w["responses"]) for w in group]
        responses, state = _cat(group, "responses", device), _cat(group, "state", device)
        neural = _chunked(lambda r, s: model.encode(r, coords=coords, x_stats=x_stats, state=s,
                                                    animal=name)[:2], responses, state)
        free = None
        if free_stats is not None:
            free = _chunked(lambda r, s: model.encode(r, coords=coords, x_stats=free_stats, state=s)[:1],
                            responses, state)[0].split(sizes)
        keys = [(stimulus_key(w["trial"]) if stimulus_key else (name, w["trial"]), len(w["responses"]))
                for w in group]
        new = {k: w for k, w in zip(keys, group, strict=True) if k not in cache}
        if new:
            stimuli = torch.cat([w["stimulus"] for w in new.values()]).to(device)
            mu_y, logvar_y = _chunked(lambda v: model.encode(stimulus=v)[2:4], stimuli)
            cache.update(zip(new, zip(mu_y.split([k[1] for k in new]), logvar_y.split([k[1] for k in new]),
                                      strict=True), strict=True))
        for k, (w, key) in enumerate(zip(group, keys, strict=True)):
            mu_x, logvar_x = (t.split(sizes)[k] for t in neural)
            mu_y, logvar_y = cache[key]
            g = pnba.Gaussians(mu_x, logvar_x, mu_y, logvar_y, *pnba.fuse(mu_x, logvar_x, mu_y, logvar_y))
            yield EncodedTrial(w, g, None if free is None else free[k])
        if stimulus_key is None:
            cache.clear()                               # per-trial stimuli are never met again


@torch.no_grad()
def predicted_rates(model: pnba.PNBA, animal: Animal, encoded: list[EncodedTrial], field: str = "mu_y",
                    ) -> list[torch.Tensor]:
    """The animal's Poisson rates decoded from each trial's latent `field` (mu_y: the stimulus path, what
    Sensorium scores; mu_p: the fused path), per valid frame: (valid_frames, N) float32 on the CPU."""
    if not encoded:
        return []
    latents = torch.cat([getattr(e.gaussians, field) for e in encoded])
    states = [e.windows["state"] for e in encoded]
    state = None if states[0] is None else torch.cat(states).to(latents.device)
    rates, = _chunked(lambda z, s: (model.decode_responses(z, animal.name, s),), latents, state)
    sizes = [len(e.windows["responses"]) for e in encoded]
    return [r.flatten(0, 1)[e.windows["keep"].reshape(-1)].float().cpu()
            for e, r in zip(encoded, rates.split(sizes), strict=True)]


def observed(encoded: EncodedTrial) -> torch.Tensor:
    """The trial's responses as the model sees them, per valid frame: (valid_frames, N)."""
    return encoded.windows["responses"].flatten(0, 1)[encoded.windows["keep"].reshape(-1)]


# ------------------------------------------------------------------------------------------------
# validation during training
# ------------------------------------------------------------------------------------------------

@dataclass
class ValidationSet:
    """What validate() scores, fixed once per run so that every validation sees the same trials.

    trials: per animal, the trials encoded (oracle + the train trials of the most widely shared videos);
    scored: per training animal, its oracle trials, never trained on, on which the stimulus -> neural
    prediction is scored; stimulus: pixel-pairing id per (animal, trial); ceiling and ridge: per training
    animal, the data's leave-one-out repeat correlation and the pixel ridge's correlation on those trials.
    """
    trials: dict[str, list[int]]
    scored: dict[str, list[int]]
    stimulus: dict[tuple[str, int], int]
    ceiling: dict[str, float]
    ridge: dict[str, float]


def prepare_validation(train_animals: list[Animal], heldout_animals: list[Animal]) -> ValidationSet:
    animals = train_animals + heldout_animals
    stimulus = data.stimulus_groups(animals)
    seen_by = Counter(stimulus.values())        # how many trials, over all animals, show each video
    trials, scored, ceiling, ridge = {}, {}, {}, {}
    for m in animals:
        oracle = [int(i) for i in m.trials(["oracle"], hidden=False)]
        train_tier = [int(i) for i in m.trials(["train"], hidden=False)]
        widest = sorted(train_tier, key=lambda i: (-seen_by[stimulus[(m.name, i)]], stimulus[(m.name, i)]))
        trials[m.name] = oracle + widest[:VAL_TRAIN_TRIALS]
        if m in train_animals and oracle:
            scored[m.name] = oracle
            labels = [stimulus[(m.name, i)] for i in oracle]
            responses = [m.normalised(i)[1].numpy() for i in oracle]
            ceiling[m.name] = stats.repeat_ceiling(responses, labels)
            fit = baselines.pixel_ridge(m, train_tier)
            ridge[m.name] = float(np.nanmean(stats.per_neuron_corr(
                np.concatenate([fit.predict(m, i) for i in oracle]), np.concatenate(responses))))
    return ValidationSet(trials, scored, stimulus, ceiling, ridge)


def validation_reps(model: pnba.PNBA, vset: ValidationSet, animals: list[Animal], trained: set[str],
                    frames: int, device) -> tuple[dict[str, list], dict[str, list[EncodedTrial]]]:
    """Encode the validation trials exactly as extract.py encodes them: per animal the trials' TrialReps
    (what reps.h5 would hold for them) and the EncodedTrials of its scored trials."""
    cache, reps, scored = {}, {}, {}
    for m in animals:
        x_stats = animal_statistics(model, m, frames, device)
        encoded = list(encode_trials(model, m, vset.trials[m.name], frames, device, x_stats,
                                     stimulus_key=stimulus_key(m, vset.stimulus), cache=cache))
        reps[m.name] = [data.TrialRep(m.name, str(m.tiers[e.trial]), e.trial,
                                      vset.stimulus[(m.name, e.trial)], e.windows["valid_frames"],
                                      m.name not in trained, e.arrays())
                        for e in encoded]
        scored[m.name] = [e for e in encoded if e.trial in vset.scored.get(m.name, ())]
    return reps, scored


def _mean_corr(predictions: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    prediction, target = torch.cat(predictions).numpy(), torch.cat(targets).numpy()
    return float(np.nanmean(stats.per_neuron_corr(prediction, target)))


def _mean(values) -> float:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def stimulus_to_neural(model: pnba.PNBA, animal: Animal, scored: list[EncodedTrial],
                       vset: ValidationSet) -> dict:
    """Sensorium's single-trial correlation of the stimulus path (mu_y decoded) and of the fused path on the
    scored trials, the fused path's Poisson NLL over its constant-rate floor, and the anchors."""
    targets = [observed(e) for e in scored]
    fused = predicted_rates(model, animal, scored, "mu_p")
    target = torch.cat(targets)
    return {"corr": _mean_corr(predicted_rates(model, animal, scored, "mu_y"), targets),
            "corr_fused": _mean_corr(fused, targets),
            "poisson_vs_floor": float(pnba.poisson_nll(torch.cat(fused)[None], target[None])
                                      / pnba.poisson_floor(target[None]) - 1),
            "ceiling": vset.ceiling[animal.name], "ridge_corr": vset.ridge[animal.name]}


def _short(comparison: dict) -> dict:
    centred = stats.summarise(comparison["centred"]["pooled"])
    raw = stats.summarise(comparison["raw"]["pooled"])
    return {"d": centred["cohens_d"], "p": centred["perm_p"], "paired_r": centred["paired_mean"],
            "unpaired_r": centred["unpaired_mean"], "raw_d": raw["cohens_d"]}


@torch.no_grad()
def validate(model: pnba.PNBA, vset: ValidationSet, train_animals: list[Animal],
             heldout_animals: list[Animal], frames: int, device, seed: int = 0) -> dict:
    """The three things PNBA claims, on trials fixed for the run (eval mode: means, no sampling), with the
    statistics of the stats scripts (stats.py), fewer permutations:

    - stimulus -> neural: Sensorium single-trial correlation of the stimulus path's rates (mu_y decoded)
      on the training animals' oracle trials, next to the fused path, the data's repeat ceiling and the
      pixel ridge on the same trials; Poisson NLL of the fused path over its constant-rate floor;
    - cross-modal: centred r(mu_x, mu_y) same video vs other videos (d, permutation p), training and
      held-out animals (held-out: mu_x zero-shot); identification of the video from mu_x;
    - zero-shot: centred and raw r(mu_x A, mu_x B) same vs other stimulus for every held-out pair;
    plus latent_corr, the raw correlation between the latents of different trials (collapse alarm).
    """
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(seed)
    animals = train_animals + heldout_animals
    reps, scored = validation_reps(model, vset, animals, {m.name for m in train_animals}, frames, device)
    per_animal = {m.name: stimulus_to_neural(model, m, scored[m.name], vset) if scored[m.name] else {}
                  for m in animals}
    for m in animals:
        candidates = {t.stimulus: (t.arrays["mu_y"], t.arrays["logvar_y"]) for t in reps[m.name]}
        oracle = [t for t in reps[m.name] if t.tier == "oracle"] or reps[m.name]
        ident = stats.identification(oracle, candidates)
        per_animal[m.name].update(identification_top1=ident["top1"], identification_chance=ident["chance"])

    crossmodal = {}
    for group, members in (("train", train_animals), ("heldout", heldout_animals)):
        comparisons = [stats.crossmodal(reps[m.name], VAL_PERMUTATIONS, rng) for m in members]
        crossmodal[group] = _short(stats.combine(comparisons)) if comparisons else None
    zeroshot = []
    for a, b in itertools.combinations(heldout_animals, 2):
        c = _short(stats.pair(reps[a.name], reps[b.name], VAL_PERMUTATIONS, rng))
        zeroshot.append({"a": a.name, "b": b.name, "d": c["d"], "p": c["p"], "raw_d": c["raw_d"]})
    first_windows = torch.stack([torch.as_tensor(t.arrays["mu_x"][:frames]) for r in reps.values() for t in r
                                 if len(t.arrays["mu_x"]) >= frames])
    model.train(was_training)
    scored_animals = [per_animal[m.name] for m in train_animals if "corr" in per_animal[m.name]]
    corr, ceiling = _mean(a["corr"] for a in scored_animals), _mean(a["ceiling"] for a in scored_animals)
    return {
        "corr_train_animals": corr, "corr_fused": _mean(a["corr_fused"] for a in scored_animals),
        "ceiling": ceiling,
        "fraction_of_ceiling": corr / ceiling if np.isfinite(ceiling) and ceiling > 0 else float("nan"),
        "ridge_corr": _mean(a["ridge_corr"] for a in scored_animals),
        "poisson_vs_floor": _mean(a["poisson_vs_floor"] for a in scored_animals),
        "crossmodal_train": crossmodal["train"], "crossmodal_heldout": crossmodal["heldout"],
        "identification_top1": _mean(per_animal[m.name]["identification_top1"] for m in train_animals),
        "identification_chance": _mean(per_animal[m.name]["identification_chance"] for m in train_animals),
        "zeroshot": zeroshot,
        "latent_corr": pnba.between_trial_corr(first_windows), "per_animal": per_animal}


def validation_line(val: dict) -> str:
    """One progress line: the stimulus -> neural prediction against its anchors, then alignment."""
    f = stats.fmt
    parts = [f"val corr {f(val['corr_train_animals'], '.3f')} ({f(val['fraction_of_ceiling'], '.0%')} of "
             f"the repeat ceiling {f(val['ceiling'], '.3f')}; pixel ridge {f(val['ridge_corr'], '.3f')}), "
             f"fused Poisson {f(val['poisson_vs_floor'], '+.1%')} vs floor"]
    for group in ("train", "heldout"):
        c = val[f"crossmodal_{group}"]
        if c is not None:
            parts.append(f"cross-modal {group} d {f(c['d'], '.2f')} (p {f(c['p'], '.3f')})")
    parts.append(f"identification top-1 {f(val['identification_top1'], '.2f')} "
                 f"(chance {f(val['identification_chance'], '.2f')})")
    parts += [f"zero-shot {z['a'][:12]} x {z['b'][:12]} d {f(z['d'], '.2f')}" for z in val["zeroshot"]]
    parts.append(f"latent_corr {f(val['latent_corr'], '.2f')}")
    return ", ".join(parts)
