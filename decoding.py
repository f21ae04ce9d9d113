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
- linear: fit_ridge, the one cross-validated ridge of this project (also the rates ridge's and
  baselines.pixel_ridge's; lagged gives both their history): ridge with intercept, alpha from ALPHAS (up to
  inf: the fitting mean alone) by k-fold cross-validation, chosen by the pooled R² of the out-of-fold
  predictions. Folds are groups of trials when groups are given and there are at least two (zero-shot: the
  fitting subjects, so the penalty is the one that carries over to an animal not fitted on), else trials
  (stratified by condition when labels are given).
- mlp: one hidden layer (HIDDEN_MLP units, tanh) applied to every frame; gru: one GRU layer (HIDDEN_GRU)
  over the frames of a trial with a linear readout. Both full-batch Adam (Training), early-stopped on a
  held-out share of the fitting trials (whole groups when given, else trials stratified like the folds):
  the weights of the best validation loss are kept. The readout starts at zero, so step 0 predicts the
  fitting mean and a network that learns nothing that carries over stays there.
- Zero-shot extras: shrinkage of each scored animal's predictions towards their own mean by how consistent
  they are across trials of one condition (consistency_shrinkage: uses the condition labels, never the
  scored behaviour), and how far its inputs lie outside the fitting inputs (input_range).
- Behaviour spaces: zero_shot refuses (BehaviourSpaceError, one line) to fit or score across animals whose
  behaviour is in different spaces (recordings/reps.py), e.g. velocities in files of different units.
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

# ridge penalties tried (features standardised, so one grid serves all); inf: coefficients 0, the mean alone
ALPHAS = np.append(np.logspace(-2, 6, 17), np.inf)
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


def cv_folds(n: int, k: int, labels: Sequence | None = None, seed: int = 0,
             groups: Sequence | None = None) -> np.ndarray:
    """(n,) fold of every trial: with groups (one per trial) and at least two of them, whole groups dealt in a
    seeded order to at most k folds (leave-one-group-out when there are k groups or fewer); else
    trial_folds."""
    if groups is not None:
        g = np.asarray(groups)
        names = np.unique(g)
        if len(names) >= 2:
            order = np.random.default_rng(seed).permutation(len(names))
            fold_of = {names[j]: i % k for i, j in enumerate(order)}
            return np.array([fold_of[v] for v in g], np.int64)
    return trial_folds(n, min(k, n), labels, seed)


def out_of_fold(n: int, fit_predict: Callable[[np.ndarray, np.ndarray], list], folds: int = FOLDS,
                labels: Sequence | None = None, seed: int = 0) -> list:
    """Out-of-fold predictions of n trials: for each fold of trial_folds (min(folds, n) folds, stratified by
    labels), fit_predict(fit indices, test indices) -> the test trials' predictions, in their order."""
    fold = trial_folds(n, min(folds, n), labels, seed)
    predicted: list = [None] * n
    for k in np.unique(fold):
        fit_idx, test_idx = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        for i, p in zip(test_idx, fit_predict(fit_idx, test_idx), strict=True):
            predicted[i] = p
    return predicted


def _aligned(latents: Sequence[np.ndarray], behaviour: Sequence[np.ndarray]) -> tuple[list, list]:
    """Each trial cut to the frames both arrays have (their common leading frames)."""
    n = [min(len(x), len(y)) for x, y in zip(latents, behaviour, strict=True)]
    return ([x[:k] for x, k in zip(latents, n, strict=True)],
            [y[:k] for y, k in zip(behaviour, n, strict=True)])


# ---------------------------------------------------------------------------------------------
# Decoders: fit(x, y, labels, seed) -> object with predict(list of (T, L)) -> list of (T, D); the ridge
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


def lagged(x: np.ndarray, history: int) -> np.ndarray:
    """(T, F) -> (T, F * history): x at t, t-1, ..., t-history+1 side by side (blocks of F columns), zeros
    before the first frame. The ridge's features with a history (rates ridge, baselines.pixel_ridge)."""
    T, F = x.shape
    out = np.zeros((T, F * history))
    for h in range(min(history, T)):
        out[h:, h * F:(h + 1) * F] = x[:T - h]
    return out


def _ridge_path(x: Sequence[np.ndarray], y: Sequence[np.ndarray],
                alphas: Sequence[float]) -> tuple[Standardiser, np.ndarray, np.ndarray]:
    """The inputs' Standardiser, coefficients (A, F, D) for each of the A alphas and the intercept (D,), from
    one eigendecomposition of X'X of the standardised fitting frames."""
    scale = Standardiser.fit(x)
    xs = scale(np.concatenate(x))
    ys = np.concatenate(y).astype(np.float64)
    intercept = ys.mean(0)
    s, v = np.linalg.eigh(xs.T @ xs)
    projected = v.T @ (xs.T @ (ys - intercept))
    return scale, np.stack([v @ (projected / (s + a)[:, None]) for a in alphas]), intercept


def fit_ridge(x: Sequence[np.ndarray], y: Sequence[np.ndarray], labels: Sequence | None = None, seed: int = 0,
              alphas: Sequence[float] = ALPHAS, folds: int = FOLDS, groups: Sequence | None = None) -> Ridge:
    """The one cross-validated ridge of this project (the linear decoder, the rates ridge, the pixel ridge):
    from x (T, F) to y (T, D) per trial, inputs standardised on the fitting set, with an intercept; penalty
    alpha on X'X of the standardised frames, chosen from `alphas` by k-fold cross-validation over whole
    trials (cv_folds: whole groups, e.g. subjects, when given; else trials stratified by labels), as the
    best R² of the out-of-fold predictions (mean over the components of y that vary)."""
    if len(x) < 2:
        raise ValueError(f"ridge needs at least 2 trials to choose alpha, got {len(x)}")
    fold = cv_folds(len(x), folds, labels, seed, groups)
    target = np.concatenate(y).astype(np.float64)
    sse = np.zeros((len(alphas), target.shape[1]))
    for k in np.unique(fold):
        fit_idx, test_idx = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        scale, coefs, intercept = _ridge_path([x[i] for i in fit_idx], [y[i] for i in fit_idx], alphas)
        test_x = scale(np.concatenate([x[i] for i in test_idx]))
        test_y = np.concatenate([y[i] for i in test_idx]).astype(np.float64)
        for a, coef in enumerate(coefs):       # one alpha at a time: (frames, D) each, not (A, frames, D)
            sse[a] += ((test_x @ coef + intercept - test_y) ** 2).sum(0)
    sst = ((target - target.mean(0)) ** 2).sum(0)
    varies = sst > 0
    scores = (1 - sse[:, varies] / sst[varies]).mean(1) if varies.any() else np.full(len(alphas), np.nan)
    best = int(np.nanargmax(scores)) if np.isfinite(scores).any() else 0
    scale, coefs, intercept = _ridge_path(x, y, [alphas[best]])
    return Ridge(scale, coefs[0], intercept, float(alphas[best]),
                 {float(a): float(score) for a, score in zip(alphas, scores, strict=True)})


class _GRU(torch.nn.Module):
    """(B, T, F) -> (B, T, D): one GRU layer over the frames, a linear readout per frame."""

    def __init__(self, n_in: int, n_out: int, hidden: int):
        super().__init__()
        self.gru = torch.nn.GRU(n_in, hidden, batch_first=True)
        self.readout = _zero(torch.nn.Linear(hidden, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.gru(x)[0])


def _zero(layer: torch.nn.Linear) -> torch.nn.Linear:
    """The layer with weights and bias 0: a readout that starts at the (standardised) fitting mean."""
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    return layer


def _mlp(n_in: int, n_out: int) -> torch.nn.Module:
    """(B, T, F) -> (B, T, D), frame by frame."""
    return torch.nn.Sequential(torch.nn.Linear(n_in, HIDDEN_MLP), torch.nn.Tanh(),
                               _zero(torch.nn.Linear(HIDDEN_MLP, n_out)))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
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
        with torch.no_grad(), one_thread():     # padding sits after a trial's frames: the GRU is causal
            out = self.model(xb).double().numpy()
        return [self.scale_y.inverse(out[i, :len(a)]) for i, a in enumerate(x)]

    def describe(self) -> dict:
        return {"steps": self.steps, "best_step": self.best_step, "validation_loss": self.validation_loss}


def _fit_network(make: Callable[[int, int], torch.nn.Module], x: Sequence[np.ndarray],
                 y: Sequence[np.ndarray], labels: Sequence | None, seed: int,
                 training: Training | None, groups: Sequence | None = None) -> Network:
    with one_thread():
        return _train_network(make, x, y, labels, seed, training or TRAINING, groups)


def _train_network(make: Callable[[int, int], torch.nn.Module], x: Sequence[np.ndarray],
                   y: Sequence[np.ndarray], labels: Sequence | None, seed: int,
                   training: Training, groups: Sequence | None = None) -> Network:
    if len(x) < 2:
        raise ValueError(f"a network needs at least 2 trials (fit and validation), got {len(x)}")
    scale_x, scale_y = Standardiser.fit(x), Standardiser.fit(y)
    n_parts = min(len(x), max(2, round(1 / training.validation_fraction)))
    validation = cv_folds(len(x), n_parts, labels, seed, groups) == 0
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
            training: Training | None = None, groups: Sequence | None = None) -> Network:
    """MLP (one hidden layer) from x (T, L) to y (T, D) frame by frame, early-stopped on held-out trials
    (whole groups when given)."""
    return _fit_network(_mlp, x, y, labels, seed, training, groups)


def fit_gru(x: Sequence[np.ndarray], y: Sequence[np.ndarray], labels: Sequence | None = None, seed: int = 0,
            training: Training | None = None, groups: Sequence | None = None) -> Network:
    """GRU over the frames of each trial from x (T, L) to y (T, D), early-stopped on held-out trials (whole
    groups when given)."""
    return _fit_network(lambda n_in, n_out: _GRU(n_in, n_out, HIDDEN_GRU), x, y, labels, seed, training,
                        groups)


DECODERS: dict[str, Callable] = {"linear": fit_ridge, "mlp": fit_mlp, "gru": fit_gru}


# ---------------------------------------------------------------------------------------------
# Zero-shot and within-animal decoding of latents
# ---------------------------------------------------------------------------------------------

class BehaviourSpaceError(ValueError):
    """Animals whose behaviour is in different spaces (units) in one decoder: the message is one line."""


def check_spaces(spaces: dict[str, str] | None, animals: Sequence[str]) -> None:
    """BehaviourSpaceError unless every animal named has the same behaviour space (spaces: {animal: space};
    None or an animal missing from it: nothing to check)."""
    named = {m: spaces[m] for m in animals if spaces and m in spaces}
    if len(set(named.values())) > 1:
        first = next(iter(named))
        other = next(m for m in named if named[m] != named[first])
        raise BehaviourSpaceError(
            f"behaviour spaces differ: {first} is in {named[first]!r}, {other} in {named[other]!r}; no "
            "decoder is fitted or scored across animals whose behaviour units may differ (re-extract the "
            "representations with extract.py: it stores every animal's behaviour in one space)")


OUT_OF_RANGE_QUANTILE = 0.99          # of the fitting frames' distances: the edge of the fitted inputs
OUT_OF_RANGE_FRACTION = 0.10          # a scored animal with more of its frames beyond that edge is flagged
COVARIANCE_FLOOR = 0.01               # standardised covariance: eigenvalues floored at this x their mean


@dataclass
class Distance:
    """Mahalanobis distance of frames (T, F) from a fitting set: standardised features, covariance with its
    eigenvalues floored at COVARIANCE_FLOOR x their mean (a direction the fitting set never varies in still
    counts, but finitely)."""

    scale: Standardiser
    basis: np.ndarray                 # (F, F) eigenvectors
    variance: np.ndarray              # (F,) floored eigenvalues

    @classmethod
    def fit(cls, arrays: Sequence[np.ndarray]) -> Distance:
        scale = Standardiser.fit(arrays)
        xs = scale(np.concatenate(arrays))
        values, basis = np.linalg.eigh(xs.T @ xs / len(xs))
        return cls(scale, basis, np.maximum(values, COVARIANCE_FLOOR * max(values.mean(), 1e-12)))

    def __call__(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        z = self.scale(np.concatenate(arrays)) @ self.basis
        return np.sqrt((z ** 2 / self.variance).sum(1))


def input_range(fit: dict[str, list[np.ndarray]], scored: dict[str, list[np.ndarray]],
                score: dict[str, Sequence[str]], groups: dict[str, str] | None = None) -> dict:
    """How far each scored animal's decoder inputs lie outside the fitting animals' (frames (T, F) per trial):
    the fraction of its frames whose Mahalanobis distance (Distance, fitted on all fitting frames) exceeds the
    OUT_OF_RANGE_QUANTILE of the fitting frames' own distances (about 1% for inputs from the same
    distribution), flagged out_of_range above OUT_OF_RANGE_FRACTION; the same per group of score (frames
    pooled). reference: each fitting group (groups: {animal: group}, default the animals) scored against the
    others, as a new animal would be: how far outside a new animal typically lies."""
    fit_arrays = [a for m in fit for a in fit[m]]
    distance = Distance.fit(fit_arrays)
    edge = float(np.quantile(distance(fit_arrays), OUT_OF_RANGE_QUANTILE))

    def entry(arrays: list[np.ndarray], measure: Distance, threshold: float) -> dict:
        d = measure(arrays)
        outside = float((d > threshold).mean())
        return {"outside_fraction": outside, "median_distance": float(np.median(d)),
                "out_of_range": outside > OUT_OF_RANGE_FRACTION}

    group_of = groups or {m: m for m in fit}
    reference = {}
    for g in sorted({group_of[m] for m in fit}):
        rest = [a for m in fit if group_of[m] != g for a in fit[m]]
        if not rest:
            continue
        measure = Distance.fit(rest)
        reference[g] = entry([a for m in fit if group_of[m] == g for a in fit[m]], measure,
                             float(np.quantile(measure(rest), OUT_OF_RANGE_QUANTILE)))
    return {"quantile": OUT_OF_RANGE_QUANTILE, "flag_above": OUT_OF_RANGE_FRACTION, "edge_distance": edge,
            "animals": {m: entry(scored[m], distance, edge) for m in scored},
            "groups": {g: entry([a for m in members for a in scored[m]], distance, edge)
                       for g, members in score.items() if members},
            "reference": reference}


def consistency_shrinkage(predicted: Sequence[np.ndarray], labels: Sequence) -> tuple[list[np.ndarray], list]:
    """Predictions (T, D) per trial of one animal shrunk towards their own mean, per component, by the share
    of their variance that is consistent across trials of one condition: cells (condition, frame), N frames in
    K cells; factor = (SS_cells - (K - 1) MS_within) / SS_total, clipped to [0, 1] (the chance-corrected
    fraction of variance explained by the cells, omega² style: about 0 for predictions that vary from
    trial to trial of one condition as much as between conditions). Under prediction = condition signal +
    noise with the behaviour following the signal, this is the factor that minimises the squared error. Uses
    the condition labels, never the behaviour. Returns (shrunk predictions, factor per component); factor 1
    where it cannot be estimated (no frame shares a cell, or constant predictions)."""
    p = np.concatenate(predicted).astype(np.float64)
    label_codes = np.unique(np.asarray(labels, dtype=str), return_inverse=True)[1]
    frame = np.concatenate([np.arange(len(a)) for a in predicted])
    label = np.repeat(label_codes, [len(a) for a in predicted])
    cell = np.unique(np.stack([label, frame], 1), axis=0, return_inverse=True)[1].reshape(-1)
    n, k = len(p), int(cell.max()) + 1
    mean = p.mean(0)
    e = p - mean
    count = np.bincount(cell, minlength=k).astype(np.float64)
    factors = []
    for d in range(p.shape[1]):
        cell_mean = np.bincount(cell, weights=e[:, d], minlength=k) / count
        total = float((e[:, d] ** 2).sum())
        between = float((count * cell_mean ** 2).sum())
        if n <= k or total <= 0:
            factors.append(1.0)
            continue
        within = (total - between) / (n - k)
        factors.append(float(np.clip((between - (k - 1) * within) / total, 0.0, 1.0)))
    f = np.array(factors)
    return [mean + f * (a - mean) for a in predicted], factors


def zero_shot(latents: dict[str, list], behaviour: dict[str, list], labels: dict[str, Sequence],
              fit_on: Sequence[str], score: dict[str, Sequence[str]], seed: int = 0,
              groups: dict[str, str] | None = None, spaces: dict[str, str] | None = None,
              decoders: Sequence[str] = tuple(DECODERS)) -> dict:
    """Every decoder (of `decoders`, names in DECODERS) fitted once on all trials of the animals fit_on and
    scored, with no refit, on every group of score ({group: animals}).

    latents, behaviour: {animal: list of (T, L) / (T, D) per trial}; labels: {animal: (trials,) condition},
    used to stratify the folds and by the shrinkage; groups: {animal: group} for the cross-validation over
    animals (default: every animal its own group; give subjects, so that no fold tests on a session of a
    subject it fitted); spaces: {animal: behaviour space}, BehaviourSpaceError if they differ (check_spaces).
    Returns {decoder: {"fit": its hyper-parameters, "groups": {group: r2 over all the group's trials},
    "animals": {animal: r2 + outside_fraction and out_of_range from input_range}, "shrunk": the same r2 of
    the predictions after consistency_shrinkage per scored animal, with "factors" {animal: per component},
    "input_range": input_range() of the latents (the same for every decoder: they share the input)}}.
    """
    scored = sorted({m for members in score.values() for m in members})
    check_spaces(spaces, [*fit_on, *scored])
    pairs = {m: _aligned(latents[m], behaviour[m]) for m in {*fit_on, *scored}}
    x = [a for m in fit_on for a in pairs[m][0]]
    y = [b for m in fit_on for b in pairs[m][1]]
    fit_labels = np.concatenate([np.asarray(labels[m]) for m in fit_on])
    group_of = groups or {m: m for m in fit_on}
    fit_groups = np.concatenate([[group_of[m]] * len(pairs[m][0]) for m in fit_on])
    ranges = input_range({m: pairs[m][0] for m in fit_on}, {m: pairs[m][0] for m in scored}, score, group_of)
    out = {}
    for name in decoders:
        model = DECODERS[name](x, y, fit_labels, seed, groups=fit_groups)
        predicted = {m: model.predict(pairs[m][0]) for m in scored}
        shrunk = {m: consistency_shrinkage(predicted[m], labels[m]) for m in scored}
        animals = {m: {**r2(predicted[m], pairs[m][1]),
                       **{k: ranges["animals"][m][k] for k in ("outside_fraction", "out_of_range")}}
                   for m in scored}
        out[name] = {"fit": model.describe(),
                     "groups": {g: r2([p for m in members for p in predicted[m]],
                                      [t for m in members for t in pairs[m][1]])
                                for g, members in score.items() if members},
                     "animals": animals,
                     "shrunk": {"groups": {g: r2([p for m in members for p in shrunk[m][0]],
                                                 [t for m in members for t in pairs[m][1]])
                                           for g, members in score.items() if members},
                                "animals": {m: r2(shrunk[m][0], pairs[m][1]) for m in scored},
                                "factors": {m: shrunk[m][1] for m in scored}},
                     "input_range": ranges}
    return out


def _fit_predict(fit: Callable, x: Sequence[np.ndarray], y: Sequence[np.ndarray], labels: np.ndarray,
                 seed: int) -> Callable[[np.ndarray, np.ndarray], list]:
    """out_of_fold's fit_predict for a decoder (DECODERS): fitted on the fitting trials, predicting the test
    trials."""
    def fit_predict(fit_idx: np.ndarray, test_idx: np.ndarray) -> list:
        model = fit([x[i] for i in fit_idx], [y[i] for i in fit_idx], labels[fit_idx], seed)
        return model.predict([x[i] for i in test_idx])
    return fit_predict


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
            predicted[m] = out_of_fold(len(x), _fit_predict(fit, x, y, lab, seed), folds, lab, seed)
            targets[m] = y
        out[name] = {"pooled": r2([p for m in animals for p in predicted[m]],
                                  [t for m in animals for t in targets[m]]),
                     "animals": {m: r2(predicted[m], targets[m]) for m in animals}}
    return out


# ---------------------------------------------------------------------------------------------
# The classic within-animal decoder from spike counts
# ---------------------------------------------------------------------------------------------

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
    labels = None if labels is None else np.asarray(labels)
    alphas = []

    def fit_predict(fit_idx: np.ndarray, test_idx: np.ndarray) -> list[np.ndarray]:
        fill = unit_means([spikes[i] for i in fit_idx])          # the fitting fold's means only: no leak
        features = rate_features(spikes, fill, history, smooth_bins)
        model = fit_ridge([features[i] for i in fit_idx], [velocity[i] for i in fit_idx],
                          None if labels is None else labels[fit_idx], seed)
        alphas.append(model.alpha)
        return model.predict([features[i] for i in test_idx])

    predicted = out_of_fold(len(spikes), fit_predict, folds, labels, seed)
    x = np.concatenate(spikes)
    info = {"history": history, "smooth_bins": smooth_bins, "folds": min(folds, len(spikes)),
            "alphas": alphas, "unobserved_fraction": float(np.isnan(x).mean()),
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
