"""Behaviour decoding for reach data: from per-frame latents (frames, L) to hand velocity (frames, D).

Zero-shot: each decoder is fitted on the training animals' mu_x and scored on held-out animals' mu_x with no
refit. Beside it: the within-animal bound (the same decoders, k-fold over the trials of one held-out animal),
the cross-modal reference (the same zero-shot fit from mu_y, which is computed from the kinematics), and the
classic within-animal decoder from spike counts (rates_ridge_r2) that the targets compare against.

Definitions:
- R² per velocity component = 1 - SSE / SST over all frames of all scored trials, SST about the scored set's
  own mean of that component; "mean" averages the components. Negative when worse than that mean.
- Inputs are standardised with the fitting set's per-feature mean and sd (a constant feature gets sd 1, so
  it stays constant and carries no weight); the networks also standardise the targets and undo it.
- linear: ridge with intercept, alpha from ALPHAS by k-fold cross-validation over the fitting trials (folds
  stratified by condition when labels are given), chosen by the pooled R² of the out-of-fold predictions.
- mlp: one hidden layer (HIDDEN_MLP units, tanh) applied to every frame; gru: one GRU layer (HIDDEN_GRU)
  over the frames of a trial with a linear readout. Both full-batch Adam (Training), early-stopped on a
  held-out share of the fitting trials (stratified like the folds): the weights of the best validation
  loss are kept.
- rates ridge: spike counts with NaN where a unit was not observed; each NaN is replaced by the unit's mean
  over its observed bins in the fitting trials (0 for a unit never observed there: a constant feature),
  then Gaussian smoothing over time and lagged copies, then the linear decoder above.
- Deterministic given the seed (folds, validation split, network initialisation).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d

ALPHAS = np.logspace(-2, 5, 15)       # ridge penalties tried (features standardised, so one grid serves all)
FOLDS = 5
HIDDEN_MLP, HIDDEN_GRU = 64, 32
HISTORY, SMOOTH_BINS = 5, 2          # rates ridge: lagged bins per feature (100 ms at 20 ms bins: the neurons
                                      # lead the hand), Gaussian sd in bins


@dataclass(frozen=True)
class Training:
    """Full-batch Adam with early stopping, shared by the MLP and the GRU."""

    steps: int = 400
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    eval_every: int = 10
    patience: int = 5                 # validation checks without improvement before stopping
    validation_fraction: float = 0.2  # of the fitting trials


TRAINING = Training()                 # read at call time, so a caller (or a test) can swap it


# ---------------------------------------------------------------------------------------------
# Scores, folds, scaling
# ---------------------------------------------------------------------------------------------

def r2(predicted: Sequence[np.ndarray], target: Sequence[np.ndarray]) -> dict:
    """R² of predicted against target, lists of (T, D) per trial: {"components": (D,) list, "mean",
    "n_trials", "n_frames"}; SSE and SST over all frames of all trials, SST about the target's own mean per
    component. A component with SST 0 gets NaN."""
    p = np.concatenate(predicted).astype(np.float64)
    t = np.concatenate(target).astype(np.float64)
    sse = ((t - p) ** 2).sum(0)
    sst = ((t - t.mean(0)) ** 2).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        components = np.where(sst > 0, 1 - sse / sst, np.nan)
    return {"components": components.tolist(), "mean": float(components.mean()), "n_trials": len(target),
            "n_frames": len(t)}


def trial_folds(n: int, k: int, labels: Sequence | None = None, seed: int = 0) -> np.ndarray:
    """(n,) fold 0..k-1 of every trial: shuffled, grouped by label, then dealt in turn, so every fold holds
    about the same share of every condition."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(n, np.int64) if labels is None else np.asarray(labels)
    order = rng.permutation(n)
    order = order[np.argsort(labels[order], kind="stable")]
    folds = np.empty(n, np.int64)
    folds[order] = np.arange(n) % k
    return folds


@dataclass
class Standardiser:
    """Per-feature mean and sd of a fitting set; (T, F) -> (T, F) float64."""

    mean: np.ndarray
    sd: np.ndarray

    @classmethod
    def fit(cls, arrays: Sequence[np.ndarray]) -> Standardiser:
        x = np.concatenate(arrays).astype(np.float64)
        mean, sd = x.mean(0), x.std(0)
        return cls(mean, np.where(sd > 1e-9 * np.maximum(np.abs(mean), 1), sd, 1.0))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float64) - self.mean) / self.sd

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return x * self.sd + self.mean


def _aligned(latents: Sequence[np.ndarray], behaviour: Sequence[np.ndarray]) -> tuple[list, list]:
    """Each trial cut to the frames both arrays have (their common leading frames)."""
    n = [min(len(x), len(y)) for x, y in zip(latents, behaviour, strict=True)]
    return ([x[:k] for x, k in zip(latents, n, strict=True)],
            [y[:k] for y, k in zip(behaviour, n, strict=True)])


# ---------------------------------------------------------------------------------------------
# Decoders: fit(x, y, labels, seed) -> object with predict(list of (T, L)) -> list of (T, D)
# ---------------------------------------------------------------------------------------------

@dataclass
class Ridge:
    """Linear decoder on standardised inputs: y = scale(x) @ coef + intercept."""

    scale: Standardiser
    coef: np.ndarray                  # (F, D)
    intercept: np.ndarray             # (D,)
    alpha: float
    cv_r2: dict[float, float]         # mean R² of the out-of-fold predictions per alpha tried

    def predict(self, x: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [self.scale(a) @ self.coef + self.intercept for a in x]

    def describe(self) -> dict:
        return {"alpha": self.alpha, "cv_r2": {f"{a:.3g}": s for a, s in self.cv_r2.items()}}


def _ridge_per_alpha(x: Sequence[np.ndarray], y: Sequence[np.ndarray],
                     alphas: Sequence[float]) -> list[Ridge]:
    """One Ridge per alpha on the same fitting set, from one eigendecomposition of X'X."""
    scale = Standardiser.fit(x)
    xs = scale(np.concatenate(x))
    ys = np.concatenate(y).astype(np.float64)
    intercept = ys.mean(0)
    s, v = np.linalg.eigh(xs.T @ xs)
    projected = v.T @ (xs.T @ (ys - intercept))
    return [Ridge(scale, v @ (projected / (s + a)[:, None]), intercept, float(a), {}) for a in alphas]


def fit_ridge(x: Sequence[np.ndarray], y: Sequence[np.ndarray], labels: Sequence | None = None, seed: int = 0,
              alphas: Sequence[float] = ALPHAS, folds: int = FOLDS) -> Ridge:
    """Ridge from x (T, L) to y (T, D) per trial, alpha by k-fold cross-validation over the trials."""
    if len(x) < 2:
        raise ValueError(f"ridge needs at least 2 trials to choose alpha, got {len(x)}")
    fold = trial_folds(len(x), min(folds, len(x)), labels, seed)
    predicted: list[list] = [[None] * len(x) for _ in alphas]
    for k in np.unique(fold):
        fit_idx, test_idx = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        models = _ridge_per_alpha([x[i] for i in fit_idx], [y[i] for i in fit_idx], alphas)
        for a, model in enumerate(models):
            for i, p in zip(test_idx, model.predict([x[i] for i in test_idx]), strict=True):
                predicted[a][i] = p
    scores = [r2(p, y)["mean"] for p in predicted]
    best = int(np.nanargmax(scores)) if np.isfinite(scores).any() else 0
    model = _ridge_per_alpha(x, y, [alphas[best]])[0]
    model.cv_r2 = {float(a): s for a, s in zip(alphas, scores, strict=True)}
    return model


class _GRU(torch.nn.Module):
    """(B, T, F) -> (B, T, D): one GRU layer over the frames, a linear readout per frame."""

    def __init__(self, n_in: int, n_out: int, hidden: int):
        super().__init__()
        self.gru = torch.nn.GRU(n_in, hidden, batch_first=True)
        self.readout = torch.nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.gru(x)[0])


def _mlp(n_in: int, n_out: int) -> torch.nn.Module:
    """(B, T, F) -> (B, T, D), frame by frame."""
    return torch.nn.Sequential(torch.nn.Linear(n_in, HIDDEN_MLP), torch.nn.Tanh(),
                               torch.nn.Linear(HIDDEN_MLP, n_out))


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one thread inside: these networks are too small to gain from more, and threads that wait
    on a busy machine slowed training tenfold in a measurement."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _padded(arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, max T, F) float32 zero-padded at the end, and the (n, max T) mask of real frames."""
    lengths = [len(a) for a in arrays]
    out = np.zeros((len(arrays), max(lengths), arrays[0].shape[1]), np.float32)
    for i, a in enumerate(arrays):
        out[i, :len(a)] = a
    return torch.from_numpy(out), torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]


@dataclass
class Network:
    """A trained MLP or GRU with the scalings of its fitting set."""

    model: torch.nn.Module
    scale_x: Standardiser
    scale_y: Standardiser
    steps: int                        # optimiser steps run before stopping
    best_step: int                    # the step whose weights are kept
    validation_loss: float            # at best_step: mean squared error of standardised targets

    def predict(self, x: Sequence[np.ndarray]) -> list[np.ndarray]:
        xb, _ = _padded([self.scale_x(a) for a in x])
        with torch.no_grad(), _one_thread():     # padding sits after a trial's frames: the GRU is causal
            out = self.model(xb).double().numpy()
        return [self.scale_y.inverse(out[i, :len(a)]) for i, a in enumerate(x)]

    def describe(self) -> dict:
        return {"steps": self.steps, "best_step": self.best_step, "validation_loss": self.validation_loss}


def _fit_network(make: Callable[[int, int], torch.nn.Module], x: Sequence[np.ndarray],
                 y: Sequence[np.ndarray], labels: Sequence | None, seed: int,
                 training: Training | None) -> Network:
    with _one_thread():
        return _train_network(make, x, y, labels, seed, training or TRAINING)


def _train_network(make: Callable[[int, int], torch.nn.Module], x: Sequence[np.ndarray],
                   y: Sequence[np.ndarray], labels: Sequence | None, seed: int,
                   training: Training) -> Network:
    if len(x) < 2:
        raise ValueError(f"a network needs at least 2 trials (fit and validation), got {len(x)}")
    scale_x, scale_y = Standardiser.fit(x), Standardiser.fit(y)
    n_parts = min(len(x), max(2, round(1 / training.validation_fraction)))
    validation = trial_folds(len(x), n_parts, labels, seed) == 0
    tensors = {}
    for part, keep in (("fit", ~validation), ("validation", validation)):
        idx = np.flatnonzero(keep)
        xb, mask = _padded([scale_x(x[i]) for i in idx])
        tensors[part] = (xb, _padded([scale_y(y[i]) for i in idx])[0], mask)
    with torch.random.fork_rng(devices=[]):      # a fixed initialisation without touching the global stream
        torch.manual_seed(seed)
        model = make(x[0].shape[1], y[0].shape[1])
    optimiser = torch.optim.Adam(model.parameters(), lr=training.learning_rate,
                                 weight_decay=training.weight_decay)

    def loss(part: str) -> torch.Tensor:
        xb, yb, mask = tensors[part]
        return ((model(xb) - yb) ** 2).mean(-1)[mask].mean()

    with torch.no_grad():
        best, best_step, best_state = loss("validation").item(), 0, copy.deepcopy(model.state_dict())
    step, checks_without_gain = 0, 0
    while step < training.steps and checks_without_gain < training.patience:
        step += 1
        optimiser.zero_grad()
        loss("fit").backward()
        optimiser.step()
        if step % training.eval_every == 0:
            with torch.no_grad():
                current = loss("validation").item()
            if current < best:
                best, best_step, best_state, checks_without_gain = current, step, \
                    copy.deepcopy(model.state_dict()), 0
            else:
                checks_without_gain += 1
    model.load_state_dict(best_state)
    model.eval()
    return Network(model, scale_x, scale_y, step, best_step, best)


def fit_mlp(x: Sequence[np.ndarray], y: Sequence[np.ndarray], labels: Sequence | None = None, seed: int = 0,
            training: Training | None = None) -> Network:
    """MLP (one hidden layer) from x (T, L) to y (T, D) frame by frame, early-stopped on held-out trials."""
    return _fit_network(_mlp, x, y, labels, seed, training)


def fit_gru(x: Sequence[np.ndarray], y: Sequence[np.ndarray], labels: Sequence | None = None, seed: int = 0,
            training: Training | None = None) -> Network:
    """GRU over the frames of each trial from x (T, L) to y (T, D), early-stopped on held-out trials."""
    return _fit_network(lambda n_in, n_out: _GRU(n_in, n_out, HIDDEN_GRU), x, y, labels, seed, training)


DECODERS: dict[str, Callable] = {"linear": fit_ridge, "mlp": fit_mlp, "gru": fit_gru}


# ---------------------------------------------------------------------------------------------
# Zero-shot and within-animal decoding of latents
# ---------------------------------------------------------------------------------------------

def zero_shot(latents: dict[str, list], behaviour: dict[str, list], labels: dict[str, Sequence],
              fit_on: Sequence[str], score: dict[str, Sequence[str]], seed: int = 0) -> dict:
    """Every decoder fitted once on all trials of the animals fit_on and scored, with no refit, on every
    group of score ({group: animals}).

    latents, behaviour: {animal: list of (T, L) / (T, D) per trial}; labels: {animal: (trials,) condition},
    used to stratify the folds. Returns {decoder: {"fit": its hyper-parameters, "groups": {group: r2 over
    all the group's trials}, "animals": {animal: r2}}}.
    """
    scored = sorted({m for members in score.values() for m in members})
    pairs = {m: _aligned(latents[m], behaviour[m]) for m in {*fit_on, *scored}}
    x = [a for m in fit_on for a in pairs[m][0]]
    y = [b for m in fit_on for b in pairs[m][1]]
    fit_labels = np.concatenate([np.asarray(labels[m]) for m in fit_on])
    out = {}
    for name, fit in DECODERS.items():
        model = fit(x, y, fit_labels, seed)
        predicted = {m: model.predict(pairs[m][0]) for m in scored}
        out[name] = {"fit": model.describe(),
                     "groups": {g: r2([p for m in members for p in predicted[m]],
                                      [t for m in members for t in pairs[m][1]])
                                for g, members in score.items() if members},
                     "animals": {m: r2(predicted[m], pairs[m][1]) for m in scored}}
    return out


def within_animal(latents: dict[str, list], behaviour: dict[str, list], labels: dict[str, Sequence],
                  animals: Sequence[str], folds: int = FOLDS, seed: int = 0) -> dict:
    """The bound for zero-shot decoding: every decoder fitted and scored inside one animal, k-fold over its
    trials (stratified by condition). Returns {decoder: {"pooled": r2 of the out-of-fold predictions of
    all the animals together, "animals": {animal: r2}}}."""
    out = {}
    for name, fit in DECODERS.items():
        predicted, targets = {}, {}
        for m in animals:
            x, y = _aligned(latents[m], behaviour[m])
            lab = np.asarray(labels[m])
            fold = trial_folds(len(x), min(folds, len(x)), lab, seed)
            pred: list = [None] * len(x)
            for k in np.unique(fold):
                fit_idx, test_idx = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
                model = fit([x[i] for i in fit_idx], [y[i] for i in fit_idx], lab[fit_idx], seed)
                for i, p in zip(test_idx, model.predict([x[i] for i in test_idx]), strict=True):
                    pred[i] = p
            predicted[m], targets[m] = pred, y
        out[name] = {"pooled": r2([p for m in animals for p in predicted[m]],
                                  [t for m in animals for t in targets[m]]),
                     "animals": {m: r2(predicted[m], targets[m]) for m in animals}}
    return out


# ---------------------------------------------------------------------------------------------
# The classic within-animal decoder from spike counts
# ---------------------------------------------------------------------------------------------

def lagged(rates: np.ndarray, history: int) -> np.ndarray:
    """(T, N) -> (T, N * history): the rates at t, t-1, ..., t-history+1 side by side, zeros before the
    first bin."""
    T, N = rates.shape
    out = np.zeros((T, N * history))
    for h in range(min(history, T)):
        out[h:, h * N:(h + 1) * N] = rates[:T - h]
    return out


def unit_means(spikes: Sequence[np.ndarray]) -> np.ndarray:
    """(N,) mean count of every unit over the bins where it was observed (not NaN); 0 for a unit never
    observed, whose imputed feature is then constant and carries no weight."""
    x = np.concatenate(spikes).astype(np.float64)
    observed = ~np.isnan(x)
    total = np.where(observed, x, 0).sum(0)
    return np.where(observed.any(0), total / np.maximum(observed.sum(0), 1), 0.0)


def rate_features(spikes: Sequence[np.ndarray], fill: np.ndarray, history: int,
                  smooth_bins: float) -> list[np.ndarray]:
    """Per trial (T, N) counts -> (T, N * history) features: NaN (unit not observed) replaced by fill (N,),
    Gaussian smoothing over time (sd smooth_bins bins; 0: none), then lagged copies."""
    out = []
    for s in spikes:
        rates = np.where(np.isnan(s), fill, s).astype(np.float64)
        if smooth_bins > 0:
            rates = gaussian_filter1d(rates, smooth_bins, axis=0, mode="nearest")
        out.append(lagged(rates, history))
    return out


def _rates_out_of_fold(spikes: Sequence[np.ndarray], velocity: Sequence[np.ndarray], history: int,
                       smooth_bins: float, folds: int, seed: int,
                       labels: Sequence | None) -> tuple[list[np.ndarray], dict]:
    """Out-of-fold predictions of the rates ridge for every trial, and what was done (alpha per fold)."""
    if len(spikes) != len(velocity) or any(len(s) != len(v) for s, v in zip(spikes, velocity, strict=True)):
        raise ValueError("spikes and velocity need the same trials and bins")
    fold = trial_folds(len(spikes), min(folds, len(spikes)), labels, seed)
    predicted: list = [None] * len(spikes)
    alphas = []
    for k in np.unique(fold):
        fit_idx, test_idx = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        fill = unit_means([spikes[i] for i in fit_idx])          # the fitting fold's means only: no leak
        features = rate_features(spikes, fill, history, smooth_bins)
        fit_labels = None if labels is None else np.asarray(labels)[fit_idx]
        model = fit_ridge([features[i] for i in fit_idx], [velocity[i] for i in fit_idx], fit_labels, seed)
        alphas.append(model.alpha)
        for i, p in zip(test_idx, model.predict([features[i] for i in test_idx]), strict=True):
            predicted[i] = p
    x = np.concatenate(spikes)
    info = {"history": history, "smooth_bins": smooth_bins, "folds": len(np.unique(fold)), "alphas": alphas,
            "unobserved_fraction": float(np.isnan(x).mean()),
            "units_with_unobserved_bins": int(np.isnan(x).any(0).sum())}
    return predicted, info


def rates_ridge_r2(spikes: list[np.ndarray], velocity: list[np.ndarray], history: int = HISTORY,
                   smooth_bins: float = SMOOTH_BINS, folds: int = FOLDS, seed: int = 0,
                   labels: Sequence | None = None) -> dict:
    """Within-animal ridge from spike counts to velocity, cross-validated over trials: r2() of the
    out-of-fold predictions plus what was done.

    spikes: (T, N) counts per trial, NaN where a unit was not observed (imputed with the unit's mean over
    the observed bins of the fitting fold); velocity: (T, D) per trial; history: lagged bins per feature;
    smooth_bins: Gaussian sd in bins; labels: conditions, to stratify the folds. Alpha by inner
    cross-validation on each fitting fold.
    """
    predicted, info = _rates_out_of_fold(spikes, velocity, history, smooth_bins, folds, seed, labels)
    return {**r2(predicted, velocity), **info}


def rates_baseline(sessions_spikes: dict[str, list[np.ndarray]], behaviour: dict[str, list[np.ndarray]],
                   labels: dict[str, Sequence] | None = None, seed: int = 0) -> dict:
    """rates_ridge_r2 (HISTORY, SMOOTH_BINS) for every animal: {"animals": {animal: result},
    "pooled": r2 of all the animals' out-of-fold predictions together, as zero_shot pools its groups}."""
    predicted, targets, animals = [], [], {}
    for m, spikes in sessions_spikes.items():
        pred, info = _rates_out_of_fold(spikes, behaviour[m], HISTORY, SMOOTH_BINS, FOLDS, seed,
                                        (labels or {}).get(m))
        animals[m] = {**r2(pred, behaviour[m]), **info}
        predicted += pred
        targets += list(behaviour[m])
    return {"animals": animals, "pooled": r2(predicted, targets)}
