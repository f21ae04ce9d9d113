"""python adapt.py --ckpt runs/RUN/last.pt
python adapt.py --ckpt runs/RUN/last.pt --shots 0,unsupervised,1,4,16,all --out results/ --seed 0
python adapt.py --ckpt runs/RUN/last.pt --data /data/new_mice --animals dynamic29515-10-12
python adapt.py --ckpt runs/monkey/last.pt --animals M,T --control T

A new animal beyond zero-shot: how much of a held-out animal's data PNBA needs to predict its neurons (mice)
or decode its behaviour (monkeys), beside the classic within-animal model given the same data.

For every animal to adapt (default: those in the data the checkpoint was not trained on, controls included;
--animals names them, by full name or by the part before a '-': a mouse's "dynamic90105-2-2", a monkey's
subject "M" for all its sessions) and every tier of --shots, only that animal's own parameters are fitted
(pnba.PER_ANIMAL_PARAMETERS: its readout with its state weights, and its unit embeddings where the model has
them; PNBA.add_animal creates them) with everything shared frozen (eval mode, no dropout), and it is scored
on its oracle trials, which no tier ever fits on (NWB monkeys: the held-back tier, every 5th trial of each
condition, recordings/nwb.py). Tiers:
- 0: zero-shot, nothing fitted. Monkeys: the decoders below on the animal's zero-shot mu_x, the numbers
  stats_zeroshot.py reports from reps.h5 ("zero_shot" entry: all trials, as it scores them; the curve's row:
  the oracle trials). Mice: a new mouse has no readout, so there is no stimulus -> neural prediction at
  k = 0; its scores are reported as not available (null), never as a number.
- unsupervised: fitted from the animal's train-tier responses alone, no stimulus, condition or behaviour:
  the Poisson likelihood of its own responses through the frozen neural encoder -> shared latent -> decoder
  -> its readout (autoencoding through the shared latent). Mice are then scored through the stimulus path,
  which the readout reads from the same latent space: it works as far as the model aligned mu_x with mu_y.
- k (an integer) or all: k train-tier trials per stimulus (mice: k videos, all their repeats; monkeys: k
  trials per condition), drawn by a seeded permutation, so the trials of k are among those of any larger
  k; all = every train-tier trial. Mice: the new readout is fitted to the responses from the stimulus path
  (video -> mu_y -> decoder -> readout, with the trial's behavioural state), which is what Sensorium
  scores. Monkeys: the unit embeddings and readout are fitted with the model's own objective (Poisson terms,
  behaviour from mu_x, the KL and matching terms) on those trials, mu_x standardised over them as the
  training BatchNorm did.

Scores (mice, on the oracle trials, stimulus path), Sensorium 2023's three metrics, per neuron and averaged:
single-trial correlation (per neuron over all frames of all scored trials), correlation to average (per
neuron, prediction and response each averaged over the repeats of a video, frame by frame) and FEVE
(1 - (MSE - noise variance) / (total variance - noise variance), noise variance the mean over the videos'
frames of the variance over repeats; averaged over the neurons whose explainable variance fraction exceeds
FEV_THRESHOLD, as the competition did). Monkeys: R^2 of the behaviour (decoding.py: linear, MLP and GRU,
fitted once on the training animals' identity-free mu_x exactly as stats_zeroshot.py fits them, never
refitted) from the animal's adapted mu_x, and its consistency d with the training animals (stats.between,
centred, pooled over them; oracle trials of the adapted animal against all trials of each training animal).

Beside every tier: the within-animal baseline given the same trials (mice: baselines.pixel_ridge, which
needs 2 trials; monkeys: the rates ridge of decoding.py fitted on them; monkeys also get "refit", a ridge
refitted on the tier's labelled trials' adapted mu_x), and a permutation p over stimuli (mice: the videos
of the scored trials replaced by other videos of the animal, each trial keeping its own behavioural state;
monkeys: the scored trials' condition labels permuted, against the R^2 to the condition's mean behaviour):
the stimulus-blind control must stay at chance (its smallest p over its tiers, Bonferroni-corrected, above
0.05). References: the data's repeat ceiling (mice), the training animals' own single-trial correlation
from the same model (mice) and the rates ridge cross-validated on all the animal's trials (monkeys).

Writes adapt.json, adapt.txt and adapt.png (score against k: PNBA, the baseline, the references as lines)
into --out (default: beside the checkpoint), each through a temp file renamed only when all are written.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import sys
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

# numpy's BLAS on one thread unless the caller chose: its products here are small (ridges of a few hundred
# features), and on 2 busy shared cores two threads took 25x longer than one (eigh of 320 x 320: 0.35 s
# against 0.014 s measured). Only where numpy is not loaded yet (python adapt.py), so importing adapt
# changes nothing for its importer.
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import torch
from tqdm import tqdm

import baselines
import config
import data
import decoding
import evaluate
import kernels
import pnba
import stats

DEFAULT_SHOTS = "0,unsupervised,1,4,16,all"
UNSUPERVISED = "unsupervised"
PERMUTATIONS = 1000
FEV_THRESHOLD = 0.15      # FEVE is averaged over neurons whose explainable variance fraction exceeds this
CHUNK = 64                # windows per forward pass of the frozen model


@dataclass(frozen=True)
class Fit:
    """How an animal's parameters are fitted: Adam, a fixed number of steps, no early stopping.

    Mice (the readout on cached frozen features): minibatches of `frames` frames drawn from all fit frames,
    and a Gaussian prior on every per-neuron weight (not the bias) of precision `prior` per frame fitted:
    the MAP fit, whose prior matters for one video and fades with many. Monkeys (unit embeddings and
    readout through the frozen encoder and decoder): minibatches of `encoder_batch` trials' windows.
    Chosen on both synthetic families alike (README, "A new animal beyond zero-shot")."""
    steps: int = 200
    lr: float = 5e-3
    frames: int = 256
    prior: float = 10.0
    encoder_steps: int = 60
    encoder_lr: float = 1e-2
    encoder_batch: int = 16


FIT = Fit()               # read at call time, so a caller (or a test) can swap it


class AdaptError(Exception):
    """Input adapt.py cannot use: one line naming the file or argument and the problem."""


# ------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------

def parse_shots(text: str) -> list:
    """"0,unsupervised,1,4,16,all" -> [0, "unsupervised", 1, 4, 16, "all"] (order kept, duplicates
    dropped); AdaptError naming --shots for anything else."""
    out = []
    for token in (t.strip() for t in str(text).split(",")):
        if token in ("all", UNSUPERVISED):
            value = token
        else:
            try:
                value = int(token)
            except ValueError:
                raise AdaptError(f"--shots: {token!r} is not a number of trials, 'all' or "
                                 f"'{UNSUPERVISED}' (e.g. --shots {DEFAULT_SHOTS})") from None
            if value < 0:
                raise AdaptError(f"--shots: {value} is negative; trials per stimulus are 0 or more")
        if value not in out:
            out.append(value)
    if not out:
        raise AdaptError("--shots: empty")
    return out


def tier_name(shot) -> str:
    return "0 (zero-shot)" if shot == 0 else str(shot)


def pick_animals(requested: str | None, animals: list, trained: set[str], source: str) -> list:
    """The animals to adapt: requested (comma-separated names, or the part of a name before a '-', e.g. a
    monkey's subject) or, by default, every animal of the data the checkpoint did not train on."""
    if not requested:
        chosen = [a for a in animals if a.name not in trained]
        if not chosen:
            raise AdaptError(f"{source}: every animal in the data is a training animal of the checkpoint; "
                             "pass the new animals' folders with --data")
        return chosen
    chosen = []
    for token in [t.strip() for t in requested.split(",") if t.strip()]:
        found = [a for a in animals if a.name == token or a.name.startswith(token + "-")]
        if not found:
            raise AdaptError(f"--animals: {token!r} is not an animal of the data (animals: "
                             f"{', '.join(sorted(a.name for a in animals))})")
        for a in found:
            if a.name in trained:
                raise AdaptError(f"--animals: {a.name} is a training animal of {source}; it has its own "
                                 "readout already (adapt animals the model did not train on)")
            if a not in chosen:
                chosen.append(a)
    return chosen


def synthetic_controls(paths) -> list[str]:
    """The negative controls a synthetic dataset's truth names (animal or subject names), else none."""
    out = []
    for p in paths:
        if os.path.isdir(os.path.join(p, data.TRUTH_DIR)):
            try:
                out += list(data.read_synthetic_truth(p).get("control", []))
            except (OSError, ValueError, KeyError):
                continue
    return out


# ------------------------------------------------------------------------------------------------
# trials
# ------------------------------------------------------------------------------------------------

def _stream(seed: int, *keys) -> list[int]:
    return [seed, *(zlib.crc32(str(k).encode()) for k in keys)]


def fit_trials(animal, groups: dict, shot, seed: int) -> list[int]:
    """The train-tier trials a tier fits on: k per stimulus (videos: k videos with all their repeats;
    behaviour: k trials per condition), in a seeded order per animal, nested (k's trials are among a larger
    k's); "all" and "unsupervised": every train-tier trial with responses; 0: none."""
    train = [int(i) for i in animal.trials(["train"], hidden=False)]
    if shot == 0:
        return []
    if shot in ("all", UNSUPERVISED):
        return train
    rng = np.random.default_rng(_stream(seed, animal.name))
    by_stimulus = defaultdict(list)
    for i in train:
        s = groups.get((animal.name, i), -1)
        by_stimulus[s if s >= 0 else ("trial", i)].append(i)
    if animal.stimulus_kind == "video":
        keys = sorted(by_stimulus, key=str)
        order = [keys[j] for j in rng.permutation(len(keys))]
        return sorted(i for key in order[:shot] for i in by_stimulus[key])
    chosen = []
    for key in sorted(by_stimulus, key=str):
        trials = by_stimulus[key]
        chosen += [trials[j] for j in rng.permutation(len(trials))[:shot]]
    return sorted(chosen)


def scored_trials(animal) -> list[int]:
    return [int(i) for i in animal.trials(["oracle"], hidden=False)]


def reps_order(animal, trials) -> list[int]:
    """Trials in the order reps.h5 is read (tier, trial): the order stats_zeroshot.py fits its folds in."""
    return sorted((int(i) for i in trials), key=lambda i: (str(animal.tiers[i]), i))


# ------------------------------------------------------------------------------------------------
# scores
# ------------------------------------------------------------------------------------------------

def _nanmean(x) -> float:
    x = np.asarray(x, np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def sensorium_scores(predictions: list[np.ndarray], targets: list[np.ndarray], labels) -> dict:
    """Sensorium 2023's metrics of predicted responses (T_j, N) against observed (T_j, N) per scored trial;
    labels: the stimulus of each trial (repeats share one; their common leading frames are compared).

    single_trial_corr: per neuron, r over all frames of all trials; corr_to_average: per neuron, r between
    the prediction and the response each averaged over a video's repeats, over all frames of all repeated
    videos; feve: per neuron 1 - (MSE - noise) / (total - noise), noise the mean over (video, frame) of the
    variance over repeats (ddof 1), total the variance over all repeated samples (ddof 1), MSE over the same
    samples; fev = (total - noise) / total. Means over neurons (NaN left out); feve's over neurons with
    fev > FEV_THRESHOLD (n_feve_neurons of them)."""
    labels = np.asarray(labels)
    single = stats.per_neuron_corr(np.concatenate(predictions), np.concatenate(targets))
    avg_p, avg_t, rep_p, rep_t = [], [], [], []
    for s in np.unique(labels):
        idx = np.flatnonzero(labels == s)
        n = min(len(targets[j]) for j in idx)
        p = np.stack([np.asarray(predictions[j][:n], np.float64) for j in idx])      # (R, n, N)
        t = np.stack([np.asarray(targets[j][:n], np.float64) for j in idx])
        if len(idx) >= 2:
            avg_p.append(p.mean(0))
            avg_t.append(t.mean(0))
            rep_p.append(p)
            rep_t.append(t)
    n_neurons = single.shape[0]
    nan = np.full(n_neurons, np.nan)
    corr_avg, fev, feve = nan, nan, nan
    if avg_t:
        corr_avg = stats.per_neuron_corr(np.concatenate(avg_p), np.concatenate(avg_t))
        noise = np.concatenate([t.var(0, ddof=1) for t in rep_t]).mean(0)                # (N,)
        samples = np.concatenate([t.reshape(-1, n_neurons) for t in rep_t])
        total = samples.var(0, ddof=1)
        mse = np.concatenate([((t - p) ** 2).reshape(-1, n_neurons) for t, p in zip(rep_t, rep_p,
                                                                                    strict=True)]).mean(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            fev = (total - noise) / total
            feve = 1 - (mse - noise) / (total - noise)
    reliable = np.isfinite(fev) & (fev > FEV_THRESHOLD)
    return {"single_trial_corr": _nanmean(single), "corr_to_average": _nanmean(corr_avg),
            "feve": _nanmean(feve[reliable]) if reliable.any() else float("nan"),
            "n_feve_neurons": int(reliable.sum()), "n_neurons": int(n_neurons), "n_trials": len(targets),
            "per_neuron": {"single_trial_corr": single.tolist(), "corr_to_average": corr_avg.tolist(),
                           "feve": feve.tolist(), "fev": fev.tolist()}}


def _perm_p(null: np.ndarray) -> dict:
    """stats.permutation_p of row 0 against the rest, with the null's mean and 95% quantile."""
    rest = null[1:][np.isfinite(null[1:])]
    return {"statistic": float(null[0]), "p": stats.permutation_p(null), "n_permutations": len(null) - 1,
            "null_mean": float(rest.mean()) if len(rest) else float("nan"),
            "null_q95": float(np.quantile(rest, 0.95)) if len(rest) else float("nan")}


# ------------------------------------------------------------------------------------------------
# the frozen model
# ------------------------------------------------------------------------------------------------

def load_model(ckpt_path: str, data_paths, device: str):
    """(checkpoint, config, model on its device in eval mode with every parameter frozen, animals)."""
    try:
        ckpt = pnba.load_checkpoint(ckpt_path)
        cfg = config.validate(config.from_dict(ckpt["config"]))
    except config.ConfigError as e:
        raise pnba.CheckpointError(f"{ckpt_path}: its config does not hold: {e}") from None
    if data_paths:
        cfg.data.paths = tuple(data_paths)
    if not cfg.data.paths:
        raise data.DataError(f"{ckpt_path}: the checkpoint names no data folders; pass --data")
    if cfg.model.neural_readout != "neuron":
        raise AdaptError(f"{ckpt_path}: model.neural_readout is {cfg.model.neural_readout!r}; a new animal's "
                         "readout can only be fitted with the per-neuron readout (neuron)")
    dev = config.pick_device(device)
    animals = data.mice_from_config(cfg.data)
    data.check_stimulus(animals, cfg.model.stimulus)
    data.check_state(animals, cfg.model.state_input)
    pnba.check_mice(ckpt, {a.name: a.n_neurons for a in animals}, source=ckpt_path)
    model = pnba.PNBA(cfg.model, ckpt["neuron_counts"])
    pnba.load_weights(model, ckpt, ckpt_path)
    model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return ckpt, cfg, model, dev, animals


def animal_parameters(model, name: str) -> dict[str, torch.nn.Parameter]:
    """The per-animal parameters of `name` (PER_ANIMAL_PARAMETERS), by name."""
    return {n: p for n, p in model.named_parameters()
            if n.startswith(pnba.PER_ANIMAL_PARAMETERS) and n.rsplit(".", 1)[-1] == name}


def add_animal(model, animal, mean_rate, seed: int, tier) -> dict[str, torch.nn.Parameter]:
    """A fresh set of the animal's parameters (any earlier one removed), trainable; the rest stays frozen."""
    remove_animal(model, animal.name)
    generator = torch.Generator().manual_seed(int(np.random.default_rng(_stream(seed, animal.name, tier))
                                                  .integers(2 ** 62)))
    model.add_animal(animal.name, animal.n_neurons, mean_rate, generator)
    params = animal_parameters(model, animal.name)
    for p in params.values():
        p.requires_grad_(True)
    return params


def remove_animal(model, name: str) -> None:
    """Undo add_animal: the model is again the checkpoint's."""
    for n in list(animal_parameters(model, name)):
        module = model.get_submodule(n.rsplit(".", 2)[0]) if n.count(".") >= 2 else model
        container = getattr(module, n.rsplit(".", 2)[-2])
        del container[name]
    model.neuron_counts.pop(name, None)


def _windows_of(animal, trials, frames: int, reads_state: bool) -> dict[int, dict]:
    return {i: data.eval_windows(animal, i, frames, reads_state) for i in trials}


def _per_frame(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(W, ..., T) window tensor -> (frames, ...) rows of the frames `keep` (W, T) marks, in order."""
    return t.movedim(-1, 1).flatten(0, 1)[keep.reshape(-1)]


def _trial_frames(w: dict, key: str) -> torch.Tensor:
    return w[key].flatten(0, 1)[w["keep"].reshape(-1)]


@torch.no_grad()
def decoded_features(model, latents: torch.Tensor, keeps: list[torch.Tensor]) -> list[tuple]:
    """Latent windows (W, C, n, T) of several trials (keeps: their (W_j, T) masks, in order) through the
    frozen decoder and the readout's shared stage: per trial (g (frames, r, S), z (frames, C, n))."""
    parts = []
    for k in range(0, len(latents), CHUNK):
        z = latents[k:k + CHUNK]
        parts.append(model.neural_readout.shared(model.neural_decoder(z)))
    g = torch.cat(parts)
    out, start = [], 0
    for keep in keeps:
        w = len(keep)
        out.append((_per_frame(g[start:start + w], keep), _per_frame(latents[start:start + w], keep)))
        start += w
    return out


# ------------------------------------------------------------------------------------------------
# mice: the readout on cached frozen features
# ------------------------------------------------------------------------------------------------

class VideoFeatures:
    """Per video (its stimulus id), the stimulus path's frozen features of its valid frames: g (T, r, S) from
    the decoder and the readout's shared stage, z = mu_y (T, C, n). Computed once, for every animal."""

    def __init__(self, model, frames: int, device):
        self.model, self.frames, self.device = model, frames, device
        self.cache: dict = {}

    @staticmethod
    def key(animal, groups: dict, i: int):
        s = groups.get((animal.name, i), -1)
        return s if s >= 0 else (animal.name, i)

    @torch.no_grad()
    def add(self, animal, groups: dict, trials, windows: dict | None = None) -> None:
        todo = {}
        for i in trials:
            k = self.key(animal, groups, i)
            if k not in self.cache and k not in todo:
                todo[k] = (windows[i] if windows and i in windows
                           else data.eval_windows(animal, i, self.frames))
        items = list(todo.items())
        for start in range(0, len(items), 16):          # about CHUNK windows at a time
            part = items[start:start + 16]
            video = torch.cat([w["stimulus"] for _, w in part]).to(self.device)
            mu_y = torch.cat([self.model.encode(stimulus=video[j:j + CHUNK]).mu_y
                              for j in range(0, len(video), CHUNK)])
            for (k, _), feats in zip(part, decoded_features(self.model, mu_y, [w["keep"] for _, w in part]),
                                     strict=True):
                self.cache[k] = feats

    def __getitem__(self, k):
        return self.cache[k]


@dataclass
class MouseTrial:
    """One trial of a mouse as the readout fit and the scores see it: per valid frame."""
    trial: int
    video: object                  # VideoFeatures key
    responses: torch.Tensor        # (T, N)
    state: torch.Tensor | None     # (T, state_dim)


def mouse_trials(animal, groups: dict, windows: dict) -> dict[int, MouseTrial]:
    return {i: MouseTrial(i, VideoFeatures.key(animal, groups, i), _trial_frames(w, "responses"),
                          None if w["state"] is None else _trial_frames(w, "state"))
            for i, w in windows.items()}


@torch.no_grad()
def neural_features(model, animal, windows: dict, device) -> dict[int, tuple]:
    """The unsupervised tier's inputs: per trial (g, z = mu_x) of the neural path, mu_x encoded zero-shot
    (identity-free) from its responses alone, standardised (mean_norm "batch") with its statistics over these
    windows only (PNBA.neural_statistics' definition: per element, mean and variance over the windows), so
    that nothing of the scored trials is read."""
    coords = animal.coords_tensor(device)
    items = list(windows.items())
    responses = torch.cat([w["responses"] for _, w in items]).to(device)
    states = None if items[0][1]["state"] is None else torch.cat([w["state"] for _, w in items]).to(device)
    norm = getattr(model, "mu_x_norm", None)
    # x_stats of mean 0 and variance 1 - eps: encode's standardisation (mu - mean) / sqrt(var + eps) is then
    # the identity, and one pass gives the means before it
    unit = None if norm is None else (torch.zeros((), device=device),
                                      torch.full((), 1 - norm.eps, device=device))
    mu = torch.cat([model.encode(responses[j:j + CHUNK], coords=coords, x_stats=unit,
                                 state=None if states is None else states[j:j + CHUNK]).mu_x
                    for j in range(0, len(responses), CHUNK)])
    if norm is not None:
        mean, var = mu.double().mean(0), mu.double().var(0, unbiased=False)
        mu = ((mu - mean.float()) * torch.rsqrt(var.float() + norm.eps))
    feats = decoded_features(model, mu, [w["keep"] for _, w in items])
    return {i: f for (i, _), f in zip(items, feats, strict=True)}


def _as_time(g: torch.Tensor, z: torch.Tensor, state: torch.Tensor | None) -> tuple:
    """Per-frame inputs (M, r, S), (M, C, n), (M, sd) as one window of M frames, (1, r, S, M), (1, C, n, M),
    (1, M, sd): the readout is frame by frame, and along time its products are a few large GEMMs."""
    return (g.permute(1, 2, 0)[None], z.permute(1, 2, 0)[None], None if state is None else state[None])


def fit_readout(model, animal, inputs: list[tuple], responses: list[torch.Tensor], seed: int, tier,
                fit: Fit, bar=None) -> dict[str, torch.Tensor]:
    """Fit a new readout of `animal` (Poisson likelihood, MAP with FIT.prior) to its responses (T_j, N) from
    per-frame frozen inputs (g (T_j, r, S), z (T_j, C, n), state (T_j, sd) or None) per trial, everything
    shared frozen. Returns the fitted parameters (detached copies)."""
    g = torch.cat([x[0] for x in inputs])
    z = torch.cat([x[1] for x in inputs])
    state = None if inputs[0][2] is None else torch.cat([x[2] for x in inputs]).to(g.device)
    target = torch.cat(responses).to(g.device)
    params = add_animal(model, animal, target.mean(0).cpu(), seed, tier)
    generator = torch.Generator().manual_seed(
        int(np.random.default_rng(_stream(seed, animal.name, tier, "batches")).integers(2 ** 62)))
    with decoding.one_thread():
        _readout_steps(model, animal.name, g, z, state, target, params, fit, generator, bar)
    return {n: p.detach().clone() for n, p in params.items()}


def _readout_steps(model, name, g, z, state, target, params, fit, generator, bar) -> None:
    penalised = [p for n, p in params.items() if not n.startswith("neural_readout.bias.")]
    optimiser = torch.optim.Adam(params.values(), lr=fit.lr)
    M, batch = len(target), min(fit.frames, len(target))
    order, at = torch.randperm(M, generator=generator), 0
    for _ in range(fit.steps):
        if at + batch > M:
            order, at = torch.randperm(M, generator=generator), 0
        idx = order[at:at + batch].to(g.device)
        at += batch
        g_t, z_t, state_t = _as_time(g[idx], z[idx], None if state is None else state[idx])
        rate = model.neural_readout.read(g_t, name, z_t, state_t)[0]
        loss = pnba.poisson_nll(rate, target[idx]) + fit.prior / M * sum(p.pow(2).sum() for p in penalised)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if bar is not None:
            bar.update()


@torch.no_grad()
def readout_drive(model, name: str, g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(T, N) drive of the readout of `name` without the state's part."""
    g_t, z_t, _ = _as_time(g, z, None)
    return model.neural_readout.drive(g_t, name, z_t)[0]


@torch.no_grad()
def state_drive(model, name: str, state: torch.Tensor | None) -> torch.Tensor | float:
    readout = model.neural_readout
    if state is None or not hasattr(readout, "state"):
        return 0.0
    weight = readout.state[name]
    return state.to(device=weight.device, dtype=weight.dtype) @ weight


def _rate(drive: torch.Tensor) -> np.ndarray:
    return (torch.nn.functional.elu(drive) + 1).double().cpu().numpy()


def video_null(model, name: str, videos: VideoFeatures, pool: list, scored: list[MouseTrial], labels,
               n_perm: int, rng: np.random.Generator) -> dict:
    """Permutation test of the single-trial correlation over stimuli: row 0 the scored trials' own videos;
    each null row gives every scored video (all its repeats) another video of the animal's pool (distinct, at
    least as long), each trial keeping its own behavioural state. The statistic of a row, from per-(video,
    trial) sums, is the mean over neurons of r over all frames (single_trial_corr)."""
    own = [t.video for t in scored]
    pool = list(dict.fromkeys([*own, *pool]))
    lengths = np.array([len(videos[v][0]) for v in pool])
    labels = np.asarray(labels)
    J, N = len(scored), scored[0].responses.shape[1]
    sums = np.full((len(pool), J, 3, N), np.nan)         # sum p, sum p^2, sum p*t
    t_stats = []
    with decoding.one_thread():
        drives = readout_drive(model, name, torch.cat([videos[v][0] for v in pool]),
                               torch.cat([videos[v][1] for v in pool])).split(lengths.tolist())
        for j, t in enumerate(scored):
            target = t.responses.double().cpu().numpy()
            T = len(target)
            t_stats.append((T, target.sum(0), (target ** 2).sum(0)))
            ok = np.flatnonzero(lengths >= T)
            p = _rate(torch.stack([drives[v][:T] for v in ok]) + state_drive(model, name, t.state))
            sums[ok, j] = np.stack([p.sum(1), (p ** 2).sum(1), (p * target).sum(1)], axis=1)
    M = sum(s[0] for s in t_stats)
    St = sum(s[1] for s in t_stats)
    Stt = sum(s[2] for s in t_stats)
    groups = list(dict.fromkeys(labels.tolist()))
    members = {s: np.flatnonzero(labels == s) for s in groups}
    need = {s: max(t_stats[j][0] for j in members[s]) for s in groups}
    own_idx = {s: pool.index(own[members[s][0]]) for s in groups}

    def statistic(assign: dict) -> float:
        tot = sum(sums[assign[s], j] for s in groups for j in members[s])
        sp, spp, spt = tot
        with np.errstate(invalid="ignore", divide="ignore"):
            r = (spt - sp * St / M) / np.sqrt((spp - sp ** 2 / M) * (Stt - St ** 2 / M))
        return _nanmean(r)

    null = [statistic(own_idx)]
    for _ in range(n_perm):
        order, used, assign = rng.permutation(len(pool)), set(), {}
        for s in groups:
            pick = next((v for v in order if v not in used and lengths[v] >= need[s]), None)
            if pick is None:
                break
            used.add(pick)
            assign[s] = pick
        null.append(statistic(assign) if len(assign) == len(groups) else np.nan)
    return {**_perm_p(np.array(null)), "pool": len(pool),
            "null": "the scored videos replaced by other videos of the animal (pool), each trial's state "
                    "kept; statistic: single-trial r"}


def ridge_scores(animal, fit_on: list[int], scored: list[MouseTrial], labels) -> dict:
    """baselines.pixel_ridge fitted on the trials a tier fits on, scored like PNBA; skipped where it cannot
    be fitted (too few trials to choose its penalty)."""
    try:
        fitted = baselines.pixel_ridge(animal, fit_on)
    except ValueError as e:                   # too few trials to choose its penalty
        return {"skipped": str(e)}
    predictions = [fitted.predict(animal, t.trial)[:len(t.responses)] for t in scored]
    out = sensorium_scores(predictions, [t.responses.double().numpy() for t in scored], labels)
    return out


def reuse(rows: list[dict], row: dict, bar, steps: int) -> bool:
    """When an earlier tier with labels fitted on exactly the trials of `row` (k above what the animal has:
    16 per condition where there are 11 is all of them), its results stand for this tier too: `row` gets
    them, with same_trials_as, and is appended; True then."""
    if row["k"] in (0, UNSUPERVISED):
        return False
    same = next((r for r in rows if r["k"] not in (0, UNSUPERVISED) and r["fit_trials"] == row["fit_trials"]),
                None)
    if same is None:
        return False
    rows.append({**same, "tier": row["tier"], "k": row["k"], "same_trials_as": same["tier"], "wall_s": 0.0})
    if bar is not None:
        bar.update(steps)
    return True


def adapt_mouse(model, animal, groups: dict, shots: list, videos: VideoFeatures, frames: int, device,
                seed: int, n_perm: int, fit: Fit, bar) -> dict:
    """Every tier of one mouse: fits, scores, the pixel ridge and the permutation test."""
    reads_state = model.cfg.state_input != "none"
    train = [int(i) for i in animal.trials(["train"], hidden=False)]
    scored_ids = scored_trials(animal)
    windows = _windows_of(animal, train + scored_ids, frames, reads_state)
    trials = mouse_trials(animal, groups, windows)
    videos.add(animal, groups, list(windows), windows)
    pool_trials = [int(i) for i in animal.trials()]            # every video the animal was shown
    videos.add(animal, groups, pool_trials)
    pool = list(dict.fromkeys(VideoFeatures.key(animal, groups, i) for i in pool_trials))
    scored = [trials[i] for i in scored_ids]
    labels = [groups.get((animal.name, i), -1 - k) for k, i in enumerate(scored_ids)]
    targets = [t.responses.double().cpu().numpy() for t in scored]
    out = {"scored_trials": scored_ids,
           "ceiling": stats.repeat_ceiling(targets, labels), "rows": []}
    unsupervised_inputs = None
    for shot in shots:
        t0 = time.time()
        fit_on = fit_trials(animal, groups, shot, seed)
        row = {"tier": str(shot), "k": shot, "fit_trials": fit_on, "n_fit_trials": len(fit_on)}
        if reuse(out["rows"], row, bar, fit.steps):
            continue
        if shot == 0:
            row["pnba"] = {"not_available": "zero-shot: a new mouse has no readout, so PNBA makes no "
                                            "stimulus -> neural prediction for it (see the unsupervised "
                                            "tier)"}
            row["baseline"] = {"skipped": "no trials to fit on"}
            out["rows"].append(row)
            continue
        if shot == UNSUPERVISED:
            if unsupervised_inputs is None:
                unsupervised_inputs = neural_features(model, animal, {i: windows[i] for i in train}, device)
            inputs = [(*unsupervised_inputs[i], trials[i].state) for i in fit_on]
        else:
            inputs = [(*videos[trials[i].video], trials[i].state) for i in fit_on]
        bar.set_postfix_str(f"{short(animal.name)} {shot}")
        fit_readout(model, animal, inputs, [trials[i].responses for i in fit_on], seed, shot, fit, bar)
        with decoding.one_thread():
            predictions = [_rate(readout_drive(model, animal.name, *videos[t.video])[:len(t.responses)]
                                 + state_drive(model, animal.name, t.state)) for t in scored]
        row["pnba"] = sensorium_scores(predictions, targets, labels)
        row["permutation"] = video_null(model, animal.name, videos, pool, scored, labels, n_perm,
                                        np.random.default_rng(_stream(seed, animal.name, shot, "null")))
        row["baseline"] = ridge_scores(animal, fit_on, scored, labels) if shot != UNSUPERVISED else \
            {"skipped": "the pixel ridge needs the stimulus"}
        row["wall_s"] = time.time() - t0
        out["rows"].append(row)
        remove_animal(model, animal.name)
    return out


def training_reference(model, animals: list, groups: dict, videos: VideoFeatures, frames: int) -> dict:
    """The training animals' own single-trial correlation on their oracle trials, from the same model and the
    same stimulus path (their trained readouts): what a new animal's adapted readout is measured against."""
    per_animal = {}
    reads_state = model.cfg.state_input != "none"
    for a in animals:
        ids = scored_trials(a)
        if not ids:
            continue
        windows = _windows_of(a, ids, frames, reads_state)
        videos.add(a, groups, ids, windows)
        trials = mouse_trials(a, groups, windows)
        predictions = [_rate(readout_drive(model, a.name, *videos[t.video])[:len(t.responses)]
                             + state_drive(model, a.name, t.state)) for t in trials.values()]
        targets = [t.responses.double().numpy() for t in trials.values()]
        corr = stats.per_neuron_corr(np.concatenate(predictions), np.concatenate(targets))
        per_animal[a.name] = _nanmean(corr)
    return {"single_trial_corr": _nanmean(list(per_animal.values())), "animals": per_animal}


# ------------------------------------------------------------------------------------------------
# monkeys: unit embeddings and readout through the frozen encoder
# ------------------------------------------------------------------------------------------------

def _standardised(mu: torch.Tensor, eps: float) -> torch.Tensor:
    """mu (B, C, n, T) standardised per element over the batch, as BatchNorm does in training."""
    return (mu - mu.mean(0)) * torch.rsqrt(mu.var(0, unbiased=False) + eps)


def encoder_objective(model, name: str, batch: dict, x_stats, supervised: bool) -> torch.Tensor:
    """The PNBA objective of one animal's batch with only its own parameters free: eval mode (means, no
    sampling), mu_x standardised over the batch (training's BatchNorm), mu_y as evaluation encodes it.
    supervised: every term of pnba.PNBA.forward with the config's weights; else (no stimulus, condition or
    behaviour) the Poisson likelihood of the responses decoded from mu_x alone (autoencoding)."""
    c = model.cfg
    responses, observed = batch["responses"], batch["observed"]
    g = model.encode(responses, coords=batch["coords"], x_stats=x_stats, state=batch["state"], animal=name)
    mu_x = _standardised(g.mu_x, model.mu_x_norm.eps) if hasattr(model, "mu_x_norm") else g.mu_x
    if not supervised:
        return pnba.poisson_nll(model.decode_responses(mu_x, name, batch["state"]), responses, observed)
    mu_y, logvar_y = batch["mu_y"], batch["logvar_y"]
    B, shape = len(mu_x), mu_x.shape
    flat = [t.reshape(B, -1) for t in (mu_x, g.logvar_x, mu_y, logvar_y)]
    zeros = (torch.zeros_like(flat[0]),) * 3
    mu_p, _, z_p, z_x, z_y, kl_px, kl_py, kl_sym = kernels.fuse_sample_kl(*flat, *zeros, backend=c.kernels)
    state2 = None if batch["state"] is None else torch.cat([batch["state"]] * 2)
    rate, rate_cross = model.decode_responses(torch.cat([z_p, z_y]).view(2 * B, *shape[1:]), name,
                                              state2).chunk(2)
    stimulus = batch["stimulus"]
    rec, cross = model.decode_stimulus(torch.cat([z_p, z_x]).view(2 * B, *shape[1:]), stimulus.shape).chunk(2)
    terms = dict(poisson=pnba.poisson_nll(rate, responses, observed),
                 poisson_cross=pnba.poisson_nll(rate_cross, responses, observed),
                 stimulus=pnba.squared_error(rec, stimulus),
                 stimulus_cross=pnba.squared_error(cross, stimulus),
                 kl_fusion=(kl_px + kl_py).sum() / B, kl_cross=kl_sym.sum() / B,
                 kl_prior=(pnba.standard_normal_kl(flat[0], flat[1])
                           + pnba.standard_normal_kl(flat[2], flat[3])).sum() / B,
                 match=kernels.match_loss(flat[2], flat[3], flat[0], flat[1], model.match_scale,
                                          model.match_bias, backend=c.kernels) / B)
    return sum(getattr(c, f"w_{k}") * v for k, v in terms.items())


def fit_encoder(model, animal, windows: list[dict], device, seed: int, tier, supervised: bool, fit: Fit,
                bar=None) -> None:
    """Fit the animal's unit embeddings and readout with encoder_objective on minibatches of its fit trials'
    windows (fit.encoder_batch, like a training batch: one animal, standardised over the batch)."""
    def cat(key):
        return None if windows[0][key] is None else torch.cat([w[key] for w in windows]).to(device)

    data_ = {k: cat(k) for k in ("responses", "stimulus", "state", "observed")}
    if supervised:
        with torch.no_grad():
            gy = model.encode(stimulus=data_["stimulus"])
        data_["mu_y"], data_["logvar_y"] = gy.mu_y, gy.logvar_y
    params = add_animal(model, animal, data_["responses"].mean((0, 1)).cpu(), seed, tier)
    generator = torch.Generator().manual_seed(
        int(np.random.default_rng(_stream(seed, animal.name, tier, "batches")).integers(2 ** 62)))
    W = len(data_["responses"])
    batch = min(fit.encoder_batch, W)
    coords = animal.coords_tensor(device)
    with decoding.one_thread():
        optimiser = torch.optim.Adam(params.values(), lr=fit.encoder_lr)
        order, at = torch.randperm(W, generator=generator), 0
        for _ in range(fit.encoder_steps):
            if at + batch > W:
                order, at = torch.randperm(W, generator=generator), 0
            idx = order[at:at + batch].to(device)
            at += batch
            part = {k: None if v is None else v[idx] for k, v in data_.items()}
            # x_stats None: encode standardises with the running statistics, an affine map the
            # standardisation over the batch undoes
            loss = encoder_objective(model, animal.name, {**part, "coords": coords}, None, supervised)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if bar is not None:
                bar.update()


@torch.no_grad()
def encoded_latents(model, animal, trials: list[int], frames: int, device, identity: bool,
                    free: bool = False) -> dict[int, dict]:
    """Per trial the arrays reps.h5 holds (mu_x, ...; mu_x_free with free), encoded as extract.py encodes
    them (evaluate.py): the animal's own statistics over its trials, its unit embeddings when identity."""
    x_stats = evaluate.animal_statistics(model, animal, frames, device, identity=identity)
    free_stats = evaluate.animal_statistics(model, animal, frames, device, identity=False) if free else None
    encoded = evaluate.encode_trials(model, animal, trials, frames, device, x_stats, free_stats)
    return {e.trial: e.arrays() for e in encoded}


class Decoders:
    """The behaviour decoders of stats_zeroshot.py: decoding.DECODERS fitted once on every trial of the
    training animals (their identity-free mu_x, mu_x_free, where the model has unit embeddings), in the
    order reps.h5 is read (animal, tier, trial), folds over subjects, the same seed: the same fits."""

    def __init__(self, latents: dict[str, dict[int, dict]], animals: dict, groups: dict, seed: int):
        self.x, self.y, labels, subjects = [], [], [], []
        for name in sorted(latents):
            a = animals[name]
            for i in reps_order(a, latents[name]):
                arrays = latents[name][i]
                x, y = _aligned([arrays.get("mu_x_free", arrays["mu_x"])], [a.normalised_behaviour(i)])
                self.x += x
                self.y += y
                labels.append(groups[(name, i)])
                subjects.append(a.subject)
        self.models = {d: fit(self.x, self.y, np.array(labels), seed, groups=np.array(subjects))
                       for d, fit in decoding.DECODERS.items()}

    def predict(self, latents: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
        return {d: m.predict(latents) for d, m in self.models.items()}


def _aligned(x: list, y: list) -> tuple[list, list]:
    n = [min(len(a), len(b)) for a, b in zip(x, y, strict=True)]
    return [a[:k] for a, k in zip(x, n, strict=True)], [b[:k] for b, k in zip(y, n, strict=True)]


def decoding_scores(decoders: Decoders, latents: list[np.ndarray], behaviour: list[np.ndarray]) -> dict:
    x, y = _aligned(latents, behaviour)
    return {d: decoding.r2(p, y) for d, p in decoders.predict(x).items()}


def condition_null(predicted: list[np.ndarray], labels, templates: dict, n_perm: int,
                   rng: np.random.Generator) -> dict:
    """Permutation test over stimuli of decoded behaviour (T, D) per scored trial: the statistic is the R^2
    (mean over components) of each trial's prediction against the mean behaviour of its condition
    (`templates`: condition -> (T, D), over the animal's trials of it), null rows with the condition labels
    permuted over the scored trials. Against the condition's mean, not the trial's own behaviour: what a
    trial shares with its own reach but not with its condition (its speed, its timing) cannot make p small."""
    labels = np.asarray(labels)
    n = min(min(len(a) for a in predicted), min(len(t) for t in templates.values()))
    p = np.stack([a[:n] for a in predicted]).astype(np.float64)                # (J, n, D)
    keys = sorted(templates)
    t = np.stack([np.asarray(templates[k][:n], np.float64) for k in keys])      # (K, n, D)
    index = np.array([keys.index(c) for c in labels])
    # squared error of every prediction against every template: (J, K, D)
    cross = ((p[:, None] - t[None]) ** 2).sum(2)
    J = len(p)

    def r2(assign: np.ndarray) -> float:
        target = t[assign]                                                     # (J, n, D)
        sst = ((target - target.reshape(-1, target.shape[-1]).mean(0)) ** 2).sum((0, 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return float(np.mean(1 - cross[np.arange(J), assign].sum(0) / sst))
    null = np.array([r2(index)] + [r2(index[rng.permutation(J)]) for _ in range(n_perm)])
    return {**_perm_p(null), "null": "the scored trials' condition labels permuted; statistic: R^2 against "
                                     "the condition's mean behaviour"}


def consistency(adapted: dict[int, dict], animal, references: dict[str, dict[int, dict]], animals: dict,
                groups: dict, trials: list[int], n_perm: int, seed: int) -> dict:
    """stats.between of the animal's mu_x on `trials` against every trial of each reference animal (same
    condition vs other), pooled over them: centred d and its permutation p (stats.summarise)."""
    results, per_animal = [], {}
    xa = [adapted[i]["mu_x"] for i in trials]
    la = [groups[(animal.name, i)] for i in trials]
    ta = [str(animal.tiers[i]) for i in trials]
    for name in sorted(references):
        b, ref = animals[name], references[name]
        if not set(la) & {groups[(name, i)] for i in ref}:
            continue                              # no condition in common (another task layout): no pair
        order = reps_order(b, ref)
        c = stats.between(xa, [ref[i]["mu_x"] for i in order], la, [groups[(name, i)] for i in order], ta,
                          [str(b.tiers[i]) for i in order], n_perm,
                          np.random.default_rng(_stream(seed, animal.name, name)))
        results.append(c)
        per_animal[name] = stats.summarise(c["centred"]["pooled"])["cohens_d"]
    pooled = stats.summarise(stats.combine(results)["centred"]["pooled"])
    return {"d": pooled["cohens_d"], "p": pooled["perm_p"], "paired_r": pooled["paired_mean"],
            "unpaired_r": pooled["unpaired_mean"], "animals": per_animal}


def rates_ridge_scores(animal, fit_on: list[int], scored: list[int], seed: int, groups: dict) -> dict:
    """The rates ridge of decoding.py (smoothed, lagged spike counts, NaN imputed with the fitting trials'
    unit means) fitted on the tier's trials and scored on the scored trials; R^2 (mean over components)."""
    if len(fit_on) < 2:
        return {"skipped": f"the rates ridge needs 2 trials, the tier has {len(fit_on)}"}
    spikes = {i: animal.spike_counts(i) for i in fit_on + scored}     # NaN where a unit was not recorded
    fill = decoding.unit_means([spikes[i] for i in fit_on])
    feats = dict(zip(fit_on + scored, decoding.rate_features([spikes[i] for i in fit_on + scored], fill,
                                                             decoding.HISTORY, decoding.SMOOTH_BINS),
                     strict=True))
    model = decoding.fit_ridge([feats[i] for i in fit_on], [animal.normalised_behaviour(i) for i in fit_on],
                               [groups[(animal.name, i)] for i in fit_on], seed)
    return {"linear": decoding.r2(model.predict([feats[i] for i in scored]),
                                  [animal.normalised_behaviour(i) for i in scored]), "alpha": model.alpha}


def refit_scores(latents: dict, behaviour: dict, fit_on: list[int], scored: list[int], animal, groups: dict,
                 seed: int) -> dict:
    """The linear decoder (decoding.fit_ridge) refitted on the tier's labelled trials' adapted mu_x, scored
    on the scored trials: what a user with those labels would also do. R^2 (mean over components)."""
    if len(fit_on) < 2:
        return {"skipped": f"a ridge needs 2 trials to choose its penalty, the tier has {len(fit_on)}"}
    xf, yf = _aligned([latents[i]["mu_x"] for i in fit_on], [behaviour[i] for i in fit_on])
    ridge = decoding.fit_ridge(xf, yf, [groups[(animal.name, i)] for i in fit_on], seed)
    xs, ys = _aligned([latents[i]["mu_x"] for i in scored], [behaviour[i] for i in scored])
    return {**decoding.r2(ridge.predict(xs), ys), "alpha": ridge.alpha}


def adapt_monkey(model, animal, groups: dict, shots: list, decoders: Decoders, references: dict,
                 animals: dict, frames: int, device, seed: int, n_perm: int, fit: Fit, bar) -> dict:
    """Every tier of one monkey session: fits, decoding, consistency, rates ridge, permutation test."""
    all_trials = reps_order(animal, animal.trials(None, hidden=False))
    scored = scored_trials(animal)
    behaviour = {i: animal.normalised_behaviour(i) for i in all_trials}
    conditions = defaultdict(list)
    for i in all_trials:
        conditions[groups[(animal.name, i)]].append(behaviour[i])
    templates = {c: np.mean(np.stack([b[:min(len(x) for x in bs)] for b in bs]), axis=0)
                 for c, bs in conditions.items()}
    spikes = {i: animal.spike_counts(i) for i in all_trials}
    # in the data's trial order, as extract.py encodes them (the same windows go through the model together)
    zero = encoded_latents(model, animal, [int(i) for i in animal.trials(None, hidden=False)], frames, device,
                           identity=False)
    out = {"scored_trials": scored, "rows": [],
           "rates_ridge_all": decoding.rates_ridge_r2([spikes[i] for i in all_trials],
                                                      [behaviour[i] for i in all_trials], seed=seed,
                                                      labels=[groups[(animal.name, i)] for i in all_trials]),
           "zero_shot": {"trials": len(all_trials),
                         "decoding": decoding_scores(decoders, [zero[i]["mu_x"] for i in all_trials],
                                                     [behaviour[i] for i in all_trials]),
                         "consistency": consistency(zero, animal, references, animals, groups, all_trials,
                                                    n_perm, seed)}}
    adaptable = hasattr(model, "unit_embedding")
    for shot in shots:
        t0 = time.time()
        fit_on = fit_trials(animal, groups, shot, seed)
        row = {"tier": str(shot), "k": shot, "fit_trials": fit_on, "n_fit_trials": len(fit_on)}
        if reuse(out["rows"], row, bar, fit.encoder_steps if adaptable else 0):
            continue
        latents = zero
        if shot != 0 and adaptable:
            bar.set_postfix_str(f"{short(animal.name)} {shot}")
            windows = [data.eval_windows(animal, i, frames, model.cfg.state_input != "none") for i in fit_on]
            fit_encoder(model, animal, windows, device, seed, shot, shot != UNSUPERVISED, fit, bar)
            latents = encoded_latents(model, animal, [int(i) for i in animal.trials(None, hidden=False)],
                                      frames, device, identity=True)
            remove_animal(model, animal.name)
        elif shot != 0:
            row["note"] = "the model has no unit embeddings: no encoder parameter of a new animal to fit"
        x = [latents[i]["mu_x"] for i in scored]
        y = [behaviour[i] for i in scored]
        row["pnba"] = {"decoding": decoding_scores(decoders, x, y),
                       "consistency": consistency(latents, animal, references, animals, groups, scored,
                                                  n_perm, seed),
                       "refit_linear": refit_scores(latents, behaviour, fit_on, scored, animal, groups, seed)
                       if shot != UNSUPERVISED else {"skipped": "refitting a decoder needs the behaviour"}}
        predicted = decoders.predict(_aligned(x, y)[0])["linear"]
        row["permutation"] = condition_null(predicted, [groups[(animal.name, i)] for i in scored], templates,
                                            n_perm, np.random.default_rng(_stream(seed, animal.name, shot,
                                                                                  "null")))
        row["baseline"] = rates_ridge_scores(animal, fit_on, scored, seed, groups) if shot != UNSUPERVISED \
            else {"skipped": "the rates ridge needs the behaviour"}
        row["wall_s"] = time.time() - t0
        out["rows"].append(row)
    return out


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------

def short(name: str) -> str:
    return name.split("-Video-")[0]


def _f(x, spec=".3f") -> str:
    return stats.fmt(x, spec) if isinstance(x, (int, float)) and x is not None else "n/a"


def headline(kind: str, row: dict) -> tuple[float, float]:
    """(PNBA's score, the baseline's) that the curve plots: single-trial r (mice), linear R^2 (monkeys)."""
    pnba_entry, base = row.get("pnba", {}), row.get("baseline", {})
    if kind == "video":
        return pnba_entry.get("single_trial_corr", float("nan")), base.get("single_trial_corr", float("nan"))
    return (pnba_entry.get("decoding", {}).get("linear", {}).get("mean", float("nan")),
            base.get("linear", {}).get("mean", float("nan")))


def text_report(result: dict) -> str:
    kind = result["kind"]
    lines = ["PNBA beyond zero-shot: a new animal's own parameters fitted on k trials per stimulus, shared "
             "core frozen (adapt.py)", f"checkpoint: {result['checkpoint']}",
             f"data: {', '.join(result['data'])}",
             f"tiers: {', '.join(map(str, result['shots']))}; seed {result['seed']}; "
             f"{result['permutations']} permutations; scored on each animal's oracle trials (never fitted "
             "on)", ""]
    if kind == "video":
        ref = result["reference"]["training_animals"]["single_trial_corr"]
        lines += [f"training animals' own single-trial r on their oracle trials (same model): {_f(ref)}",
                  "columns: single-trial r, correlation to average, FEVE (PNBA / pixel ridge on the same "
                  "trials); p: permutation over videos (single-trial r); /train: single r over the training "
                  "animals'"]
        head = (f"{'animal':<18} {'role':<8} {'tier':<13} {'trials':>6} {'single r':>8} {'ridge':>7} "
                f"{'corr avg':>8} {'ridge':>7} {'FEVE':>7} {'ridge':>7} {'perm p':>7} {'/train':>6}")
    else:
        lines += ["columns: linear / MLP / GRU R^2 of the behaviour from the adapted mu_x (the zero-shot "
                  "decoders, no refit), refit: a ridge refitted on the tier's labelled trials' adapted "
                  "mu_x, rates: the rates ridge fitted on the same trials, consistency d with the "
                  "training animals and its permutation p, perm p: permutation over conditions (linear "
                  "R^2 against the condition's mean behaviour)"]
        head = (f"{'animal':<18} {'role':<8} {'tier':<13} {'trials':>6} {'linear':>7} {'mlp':>7} {'gru':>7} "
                f"{'refit':>7} {'rates':>7} {'d':>6} {'d p':>7} {'perm p':>7}")
    lines += [head, "-" * len(head)]
    for name, a in result["animals"].items():
        for row in a["rows"]:
            p, b = row.get("pnba", {}), row.get("baseline", {})
            perm = row.get("permutation", {}).get("p")
            tier = tier_name(row["k"]) + (f" (={row['same_trials_as']})" if "same_trials_as" in row else "")
            cells = (f"{short(name)[:18]:<18} {a['role']:<8} {tier:<13} "
                     f"{row['n_fit_trials']:>6} ")
            if kind == "video":
                ratio = stats.ratio(p.get("single_trial_corr"), ref)
                cells += (f"{_f(p.get('single_trial_corr')):>8} {_f(b.get('single_trial_corr')):>7} "
                          f"{_f(p.get('corr_to_average')):>8} {_f(b.get('corr_to_average')):>7} "
                          f"{_f(p.get('feve')):>7} {_f(b.get('feve')):>7} {_f(perm, '.3g'):>7} "
                          f"{_f(ratio, '.2f'):>6}")
            else:
                dec, cons = p["decoding"], p["consistency"]
                cells += (f"{_f(dec['linear']['mean']):>7} {_f(dec['mlp']['mean']):>7} "
                          f"{_f(dec['gru']['mean']):>7} {_f(p.get('refit_linear', {}).get('mean')):>7} "
                          f"{_f(b.get('linear', {}).get('mean')):>7} {_f(cons['d'], '.2f'):>6} "
                          f"{_f(cons['p'], '.3g'):>7} {_f(perm, '.3g'):>7}")
            lines.append(cells)
        if kind == "video":
            lines.append(f"{'':<18} repeat ceiling of its scored trials: {_f(a['ceiling'])}")
        else:
            z = a["zero_shot"]
            lines.append(f"{'':<18} rates ridge on all its trials (cross-validated): "
                         f"{_f(a['rates_ridge_all']['mean'])}; zero-shot on all its trials "
                         "(stats_zeroshot.py): "
                         + ", ".join(f"{d} {_f(z['decoding'][d]['mean'])}" for d in decoding.DECODERS)
                         + f", d {_f(z['consistency']['d'], '.2f')}")
    lines += ["", "targets:"]
    lines += [f"  {t['what']}: {t['value']} -> {'met' if t['met'] else 'NOT met'}" for t in result["targets"]]
    lines += ["", f"wall time {result['wall_s']:.0f} s"]
    return "\n".join(lines) + "\n"


def curve_figure(result: dict) -> bytes:
    """Score against k per animal: PNBA and the baseline, the unsupervised tier as a dashed line, the
    references (repeat ceiling and training animals' r; rates ridge on all trials) as dotted lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind, names = result["kind"], list(result["animals"])
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        a = result["animals"][name]
        rows = [r for r in a["rows"] if r["k"] != UNSUPERVISED and "same_trials_as" not in r]
        x = [max(r["n_fit_trials"], 0.5) for r in rows]
        ys = [headline(kind, r) for r in rows]
        ax.plot(x, [y[0] for y in ys], "o-", label="PNBA (frozen core)")
        ax.plot(x, [y[1] for y in ys], "s--", label="pixel ridge" if kind == "video" else "rates ridge")
        if kind != "video":
            refit = [r["pnba"].get("refit_linear", {}).get("mean", float("nan")) for r in rows]
            ax.plot(x, refit, "^:", color="tab:red", label="PNBA, ridge refitted")
        for r in a["rows"]:
            if r["k"] == UNSUPERVISED:
                ax.axhline(headline(kind, r)[0], color="tab:green", ls="-.", lw=1, label="unsupervised")
        if kind == "video":
            ax.axhline(a["ceiling"], color="k", ls=":", lw=1, label="repeat ceiling")
            ax.axhline(result["reference"]["training_animals"]["single_trial_corr"], color="tab:gray", ls=":",
                       lw=1, label="training animals")
        else:
            ax.axhline(a["rates_ridge_all"]["mean"], color="k", ls=":", lw=1, label="rates ridge, all trials")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(x)
        ax.set_xticklabels([str(r["n_fit_trials"]) for r in rows], fontsize=7)
        ax.set_xlabel("trials fitted on")
        ax.set_ylabel("single-trial r (oracle)" if kind == "video" else "linear R² (held-back trials)")
        ax.set_title(f"{short(name)} ({a['role']})", fontsize=9)
        ax.axhline(0, color="k", lw=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def check_targets(result: dict) -> list[dict]:
    """The issue's targets, measured: scores rise with k; the control at chance; all trials >= the pixel ridge
    and >= 0.8 of the training animals (mice); 16 trials per condition >= 0.8 of the rates ridge on all
    trials (monkeys)."""
    kind, out = result["kind"], []
    for name, a in result["animals"].items():
        rows = [r for r in a["rows"] if r["k"] not in (0, UNSUPERVISED) or (kind != "video" and r["k"] == 0)]
        scores = [headline(kind, r)[0] for r in rows]
        if a["role"] == "control":
            # one test per tier fitted (a tier that reused another's fit is not a test of its own): the
            # smallest p, and Bonferroni over them
            ps = [r["permutation"]["p"] for r in a["rows"]
                  if "permutation" in r and "same_trials_as" not in r]
            low = min(ps) if ps else float("nan")
            out.append({"what": f"{short(name)} (control) at chance: smallest permutation p over its "
                                f"{len(ps)} tiers (raw; Bonferroni x {len(ps)})",
                        "value": f"{_f(low, '.3g')}; {_f(min(1.0, low * len(ps)), '.3g')}",
                        "met": bool(ps) and low * len(ps) > stats.ALPHA})
            continue
        if len(scores) >= 2:
            out.append({"what": f"{short(name)}: score rises with k ({', '.join(_f(s) for s in scores)})",
                        "value": _f(scores[-1] - scores[0]), "met": bool(scores[-1] > scores[0])})
        if kind == "video":
            last = next((r for r in a["rows"] if r["k"] == "all"), None)
            if last is not None:
                ours, ridge = headline(kind, last)
                ref = result["reference"]["training_animals"]["single_trial_corr"]
                out.append({"what": f"{short(name)}, all trials: single-trial r >= pixel ridge",
                            "value": f"{_f(ours)} vs {_f(ridge)}", "met": bool(ours >= ridge)})
                out.append({"what": f"{short(name)}, all trials: single-trial r >= 0.8 x training animals'",
                            "value": f"{_f(ours)} vs 0.8 x {_f(ref)}", "met": bool(ours >= 0.8 * ref)})
        else:
            row = next((r for r in a["rows"] if r["k"] == 16), None)
            if row is not None:
                ours, rates = headline(kind, row)[0], a["rates_ridge_all"]["mean"]
                refit = row["pnba"].get("refit_linear", {}).get("mean", float("nan"))
                out.append({"what": f"{short(name)}, 16 per condition: linear R^2 >= 0.8 x rates ridge (all)",
                            "value": f"{_f(ours)} vs 0.8 x {_f(rates)}", "met": bool(ours >= 0.8 * rates)})
                out.append({"what": f"{short(name)}, 16 per condition, ridge refitted on them: linear R^2 >= "
                                    "0.8 x rates ridge (all)",
                            "value": f"{_f(refit)} vs 0.8 x {_f(rates)}", "met": bool(refit >= 0.8 * rates)})
    return out


def _summary_rows(result: dict) -> dict:
    """Per role and tier, the mean headline score over the animals of that role."""
    out = defaultdict(lambda: defaultdict(list))
    for a in result["animals"].values():
        for r in a["rows"]:
            out[a["role"]][str(r["k"])].append(headline(result["kind"], r)[0])
    return {role: {k: _nanmean(v) for k, v in tiers.items()} for role, tiers in out.items()}


# ------------------------------------------------------------------------------------------------
# the whole run
# ------------------------------------------------------------------------------------------------

METHOD = {
    "tiers": "0: zero-shot, nothing fitted; unsupervised: the animal's parameters fitted to its own "
             "train-tier responses through the frozen neural encoder and decoder (no stimulus, condition or "
             "behaviour); k: k train-tier trials per stimulus (mice: k videos with their repeats; monkeys: k "
             "per condition), seeded and nested; all: every train-tier trial",
    "fitted": "only the animal's own parameters (pnba.PER_ANIMAL_PARAMETERS); everything shared frozen, eval "
              "mode",
    "mouse_fit": "the readout from the stimulus path (video -> mu_y -> decoder -> readout, with the trial's "
                 "state): Poisson likelihood, Adam, minibatches of frames, Gaussian prior on the weights",
    "monkey_fit": "unit embeddings and readout with the model's own objective on the fit trials (full batch, "
                  "mu_x standardised over them as training's BatchNorm did)",
    "mouse_scores": "Sensorium 2023 on the oracle trials: single-trial r, correlation to average, FEVE "
                    f"(neurons with FEV > {FEV_THRESHOLD}); k = 0 not available (no readout)",
    "monkey_scores": "R² of the behaviour (decoding.py linear, MLP, GRU fitted once on the training "
                     "animals' identity-free mu_x, as stats_zeroshot.py) from the adapted mu_x of the "
                     "held-back trials; consistency d (stats.between, centred, pooled over the training "
                     "animals)",
    "baselines": "pixel ridge (mice, baselines.pixel_ridge) and rates ridge (monkeys, decoding.py) fitted on "
                 "the same trials",
    "permutation": "mice: the scored videos replaced by other videos of the animal, each trial's state kept; "
                   "monkeys: the scored trials' condition labels permuted, statistic R² against the "
                   "condition's mean behaviour; p = (1 + #null >= observed) / (1 + n)",
}


def run(ckpt_path: str, data_paths=None, requested=None, shots=None, out_dir=None, seed: int = 0,
        controls=None, n_perm: int = PERMUTATIONS, device: str = "auto", fit: Fit | None = None) -> dict:
    """Adapt, score and write adapt.json, adapt.txt, adapt.png into out_dir (default: beside the checkpoint).
    Returns the JSON entry."""
    t_start = time.time()
    fit = fit or FIT
    shots = parse_shots(DEFAULT_SHOTS if shots is None else shots) if not isinstance(shots, list) else shots
    if not os.path.isfile(ckpt_path):
        raise pnba.CheckpointError(f"{ckpt_path}: no such checkpoint")
    out_dir = out_dir or os.path.dirname(os.path.abspath(ckpt_path))
    config.check_writable(out_dir)
    ckpt, cfg, model, dev, animals = load_model(ckpt_path, data_paths, device)
    trained = set(ckpt["neuron_counts"])
    targets_ = pick_animals(requested, animals, trained, ckpt_path)
    control_names = list(controls) if controls is not None else synthetic_controls(cfg.data.paths)
    for a in targets_:
        if not scored_trials(a):
            raise data.DataError(f"{a.tiers_source}: {a.name} has no oracle trials with responses to score "
                                 "on")
    groups = data.stimulus_groups(animals)
    by_name = {a.name: a for a in animals}
    frames, kind = cfg.data.frames, animals[0].stimulus_kind
    role = {a.name: "control" if a.name in control_names or a.subject in control_names else "heldout"
            for a in targets_}
    result = {"checkpoint": str(Path(ckpt_path).resolve()), "data": list(cfg.data.paths), "kind": kind,
              "seed": seed, "shots": shots, "permutations": n_perm, "fit": dataclasses.asdict(fit),
              "method": METHOD, "animals": {}}
    rows_total = sum(1 for s in shots if s != 0) * len(targets_)
    steps = fit.steps if kind == "video" else fit.encoder_steps
    with tqdm(total=rows_total * steps, desc="adapt", unit="step", dynamic_ncols=True, disable=None) as bar:
        if kind == "video":
            videos = VideoFeatures(model, frames, dev)
            result["reference"] = {"training_animals": training_reference(
                model, [a for a in animals if a.name in trained], groups, videos, frames)}
            for a in targets_:
                result["animals"][a.name] = {"role": role[a.name], "neurons": a.n_neurons,
                                             **adapt_mouse(model, a, groups, shots, videos, frames, dev, seed,
                                                           n_perm, fit, bar)}
        else:
            train_animals = [a for a in animals if a.name in trained]
            if not train_animals:
                raise AdaptError(f"{', '.join(cfg.data.paths)}: holds none of the checkpoint's training "
                                 "animals, whose latents the behaviour decoders are fitted on; pass their "
                                 "data too")
            fit_latents = {a.name: encoded_latents(model, a, [int(i) for i in a.trials(None, hidden=False)],
                                                   frames, dev, identity=True,
                                                   free=model.identity(a.name) is not None)
                           for a in train_animals}
            decoders = Decoders(fit_latents, by_name, groups, seed)
            for a in targets_:
                result["animals"][a.name] = {"role": role[a.name], "neurons": a.n_neurons,
                                             **adapt_monkey(model, a, groups, shots, decoders, fit_latents,
                                                            by_name, frames, dev, seed, n_perm, fit, bar)}
    result["summary"] = _summary_rows(result)
    result["targets"] = check_targets(result)
    result["wall_s"] = time.time() - t_start
    text = text_report(result)
    stats.write_outputs(out_dir, {"adapt.json": stats.json_bytes(result), "adapt.txt": text.encode(),
                                  "adapt.png": curve_figure(result)})
    print(text, end="")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1],
        epilog="tiers (--shots): 0 = zero-shot, unsupervised = the animal's responses only, k = k trials per "
               "stimulus (mice: videos; monkeys: per condition), all = every train-tier trial\n"
               "example: python adapt.py --ckpt runs/RUN/last.pt --shots 0,unsupervised,1,4,16,all",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (e.g. runs/RUN/last.pt)")
    p.add_argument("--data", nargs="+", default=None,
                   help="Sensorium mouse folders or a folder holding them, or .nwb files or folders holding "
                        "them, with the animals to adapt (default: the checkpoint's own data)")
    p.add_argument("--animals", default=None,
                   help="comma-separated animals to adapt: names, or the part before a '-' (a mouse's "
                        "'dynamic90105-2-2', a monkey's subject 'M') (default: every animal of the data the "
                        "checkpoint did not train on)")
    p.add_argument("--shots", default=DEFAULT_SHOTS,
                   help=f"comma-separated tiers: integers (trials per stimulus), all, {UNSUPERVISED} "
                        f"(default {DEFAULT_SHOTS})")
    p.add_argument("--control", default=None,
                   help="comma-separated negative-control animals or subjects (default: those a synthetic "
                        "dataset's truth names, else none)")
    p.add_argument("--out", default=None, help="output folder (default: the checkpoint's folder)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the trial draws, fits and permutations (default 0)")
    p.add_argument("--permutations", type=int, default=PERMUTATIONS,
                   help=f"permutations of the tests over stimuli (default {PERMUTATIONS})")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:<i>")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on 2 cores shared with other jobs the frozen model's "
                        "passes ran 3-4x faster on one thread than on two)")
    args = p.parse_args(argv)
    try:
        shots = parse_shots(args.shots)
        if args.permutations < 1:
            raise AdaptError(f"--permutations: {args.permutations}; at least 1")
        if args.threads < 1:
            raise AdaptError(f"--threads: {args.threads}; at least 1")
        torch.set_num_threads(args.threads)
        controls = None if args.control is None else [c for c in args.control.split(",") if c]
        run(args.ckpt, args.data, args.animals, shots, args.out, args.seed, controls, args.permutations,
            args.device)
    except (AdaptError, data.DataError, pnba.CheckpointError, config.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
