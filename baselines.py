"""Baselines that need no PNBA model, on the same trials and with the same scores as the model.

    from baselines import pixel_ridge
    fit = pixel_ridge(mouse, mouse.trials(["train"], hidden=False))     # fitted on the train tier
    rates = fit.predict(mouse, trial)                                     # (T, N) predicted responses

`pixel_ridge` is the linear-nonlinear anchor for the stimulus -> neural prediction: a ridge regression
from the video, average-pooled to a coarse grid (or from the behaviour of an NWB monkey, e.g. velocity),
with a few frames of history and the squares of those features (a quadratic nonlinearity), to every
neuron's response. It is what a user asks a deep model to beat, and it reads the stimulus exactly as the
model does (normalised(), the config's video size).

The alignment baselines beside the zero-shot analysis (`stats_baselines.py`) take, per animal, a Session:
per-trial neural arrays, per-trial stimulus (or behaviour) features and the stimulus label of each trial,
never a model (animal_session reads any recording, data.Animal; array_session wraps arrays). `zeroshot`
scores them with stats.between on the same pairs and trials as PNBA:

    sessions = {m.name: animal_session(m, trials_of[m.name]) for m in mice}
    out = zeroshot(sessions, [(a, b)], ["pca_cca", "cebra", "pca", "stimulus", "summary"], n_perm=1000,
                   seed=0)

- pca_cca (Safaie et al. 2023): each animal's responses reduced to its top PCS principal components (PCA of
  its own analysed trials, frames as samples, no labels; optional log1p), then CCA between the two animals
  fitted on their trials of a random half of the stimuli and scored only on trials of the other stimuli,
  over SPLITS random halves (mean and sd over splits).
- cebra (Schneider et al. 2023; optional dependency): multi-session CEBRA-Behavior, one encoder per animal,
  stimulus PCs as the continuous label, trained on the same fit halves and scored on the same other trials.
- pca: each animal's own PCs compared as they are, no alignment (the floor).
- stimulus: the stimulus PCs themselves (video; behaviour for reaching), identical for two animals shown the
  same video (the ceiling).
- summary: per frame, statistics over the animal's neurons of its responses, each neuron z-scored over the
  animal's analysed trials (mean, sd, 10/50/90% quantiles; each statistic then z-scored over the animal's
  frames): what an encoder that ignores which neuron is which can read without any training or fitting.
"""

from __future__ import annotations

import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import decoding
import stats
from data import Animal, DataError

RIDGE_GRID = (4, 8)                           # pooled video grid (height, width)
RIDGE_LAGS = 5                                # frames of history: t, t-1, ..., t-4


def _features(stimulus: torch.Tensor) -> np.ndarray:
    """(T, H, W) video pooled to RIDGE_GRID (G = gh * gw), or (T, G) behaviour as it is -> (T, 2 * lags * G):
    the features with their history (decoding.lagged: zeros before frame 0), and their squares."""
    if stimulus.dim() == 2:
        pooled = stimulus.double().numpy()
    else:
        pooled = F.adaptive_avg_pool2d(stimulus[:, None].double(), RIDGE_GRID).flatten(1).numpy()
    history = decoding.lagged(pooled, RIDGE_LAGS)
    return np.concatenate([history, history ** 2], axis=1)


@dataclass
class PixelRidge:
    """A fitted pixel ridge for one animal: decoding.fit_ridge from the stimulus features (_features) to the
    responses (N,), its penalty chosen by cross-validation over trials (ridge.alpha)."""

    ridge: decoding.Ridge

    def predict(self, mouse: Animal, trial: int) -> np.ndarray:
        """Predicted responses (T, N) of the trial's valid frames."""
        video, _ = mouse.normalised(trial)
        return self.ridge.predict([_features(video)])[0]


def pixel_ridge(mouse: Animal, trials) -> PixelRidge:
    """Fit on `trials` of `mouse` with decoding.fit_ridge: frames of one trial are never split between the
    cross-validation's fitting and test folds."""
    trials = [int(i) for i in trials]
    if len(trials) < 2:
        raise ValueError(f"{mouse.path}: {len(trials)} trials to fit the pixel ridge on, need 2 to choose "
                         "its penalty")
    xs, ys = [], []
    for i in trials:
        video, responses = mouse.normalised(i)
        xs.append(_features(video))
        ys.append(responses.double().numpy())
    return PixelRidge(decoding.fit_ridge(xs, ys))


# ---------------------------------------------------------------------------------------------
# Alignment baselines beside the zero-shot analysis (stats_baselines.py)
# ---------------------------------------------------------------------------------------------

BASELINES = ("pca_cca", "cebra", "pca", "stimulus", "summary")
SUMMARY_QUANTILES = (0.1, 0.5, 0.9)     # summary: quantiles over neurons per frame, beside the mean and sd
PCS = 8                       # components kept: neural PCs per animal, video PCs, CCA and CEBRA dimensions
CCA_REG = 1e-2                # ridge on each side's covariance, as a fraction of its mean eigenvalue
SPLITS = 5                    # random halves of the stimuli for the fitted baselines (pca_cca, cebra)
VIDEO_GRID = (16, 32)         # the video is average-pooled to at most this grid before its PCA
CACHE_BYTES = 1 << 30         # trials read once are kept in memory up to this size (else read again)
CEBRA_PARAMS = dict(model_architecture="offset10-model", batch_size=512, learning_rate=3e-4, temperature=1.0,
                    distance="cosine", conditional="time_delta", time_offsets=10, max_iterations=2000)
CEBRA_MISSING = "cebra: not installed (pip install cebra); skipped"
SPREAD_KEYS = ("paired_mean", "unpaired_mean", "cohens_d", "perm_p")
_SEED_OF = {"pca_cca": 1, "cebra": 2, "pca": 3, "stimulus": 4, "reference": 5,    # rng streams per method
            "summary": 6}


@dataclass
class Session:
    """One animal's analysed trials as the alignment baselines see them (no model involved).

    read(k) -> (neural (T_k, N), stimulus (T_k, P)) float arrays of trial k, read on demand so that a
    dataset need not fit in memory. labels (n,) int: the stimulus of each trial (the pairing key); tiers
    (n,) str: blocks and permutation strata, as in stats.between. A recording (animal_session): mouse V1,
    normalised responses and the pooled video; monkey M1/PMd, spike counts (the unit's mean where it was not
    recorded) and hand velocity, the reach condition as the label. array_session wraps arrays in memory.
    """

    name: str
    labels: np.ndarray
    tiers: np.ndarray
    read: Callable[[int], tuple[np.ndarray, np.ndarray]]

    def __len__(self) -> int:
        return len(self.labels)


def array_session(name: str, neural: list[np.ndarray], stimulus: list[np.ndarray], labels, tiers) -> Session:
    """A Session of per-trial arrays: neural[k] (T_k, N), stimulus[k] (T_k, P)."""
    return Session(name, np.asarray(labels, np.int64), np.asarray(tiers).astype(str),
                   lambda k: (np.asarray(neural[k]), np.asarray(stimulus[k])))


def check_trials(animal: Animal, trials: list) -> None:
    """DataError (one line) unless every trial (data.TrialRep) of the representations is in the recording as
    it was extracted: the same tier and number of valid frames (else the data changed since extraction)."""
    for t in trials:
        found = str(animal.tiers[t.trial]) if 0 <= t.trial < len(animal.tiers) else "no such trial"
        if found != t.tier:
            raise DataError(f"{animal.path}: trial {t.trial} is {found!r} in the data but {t.tier!r} in the "
                            "representations; pass the folders it was extracted from with --data")
        if animal.valid_frames(t.trial) != t.valid_frames:
            raise DataError(f"{animal.path}: trial {t.trial} has {animal.valid_frames(t.trial)} valid "
                            f"frames, the representations {t.valid_frames}; pass the folders it was "
                            "extracted from")


def animal_session(animal: Animal, trials: list) -> Session:
    """The trials (data.TrialRep: trial, tier, stimulus, valid_frames) of one animal (check_trials first):
    responses (T, N) as Animal.normalised gives them, and the stimulus as features (T, P): a video (T, H, W)
    average-pooled to at most VIDEO_GRID (P = gh * gw), behaviour (T, D) as it is."""
    check_trials(animal, trials)

    def read(k: int) -> tuple[np.ndarray, np.ndarray]:
        stimulus, responses = animal.normalised(trials[k].trial)
        if stimulus.dim() == 2:
            return responses.numpy(), stimulus.numpy()
        grid = (min(VIDEO_GRID[0], stimulus.shape[1]), min(VIDEO_GRID[1], stimulus.shape[2]))
        return responses.numpy(), F.adaptive_avg_pool2d(stimulus[:, None], grid).flatten(1).numpy()

    return Session(animal.name, np.array([t.stimulus for t in trials], np.int64),
                   np.array([t.tier for t in trials]).astype(str), read)


def _prepare(neural: np.ndarray, log1p: bool) -> np.ndarray:
    x = np.asarray(neural, np.float64)
    return np.log1p(np.maximum(x, 0)) if log1p else x


class _Moments:
    """Count, sum and sum of outer products of rows (float64): a PCA in one pass over the trials."""

    def __init__(self):
        self.n, self.sum, self.outer = 0, 0.0, 0.0

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        self.n, self.sum, self.outer = self.n + len(x), self.sum + x.sum(0), self.outer + x.T @ x

    def pca(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(mean (D,), components (D, min(k, D))), by decreasing variance; each component's largest
        loading is positive (a fixed sign)."""
        mean = self.sum / self.n
        values, vectors = np.linalg.eigh(self.outer / self.n - np.outer(mean, mean))
        comps = vectors[:, np.argsort(values)[::-1][:k]]
        return mean, comps * np.sign(comps[np.abs(comps).argmax(0), np.arange(comps.shape[1])])


@dataclass
class Features:
    """Per animal, per trial: neural PCs (T, k) of the animal's own PCA and stimulus PCs (T, k) of one PCA
    over every animal's stimulus features; cache: per animal the (neural, stimulus) arrays read, or None
    per trial beyond CACHE_BYTES; seconds: reading, neural PCA, stimulus PCA."""

    neural_pcs: dict[str, list[np.ndarray]]
    stimulus_pcs: dict[str, list[np.ndarray]]
    cache: dict[str, list]
    seconds: dict[str, float]

    def neural(self, session: Session, k: int, log1p: bool) -> np.ndarray:
        """Trial k's prepared neural array (from the cache, or read again)."""
        held = self.cache[session.name][k]
        return _prepare((held or session.read(k))[0], log1p)


def features(sessions: dict[str, Session], k: int = PCS, log1p: bool = False) -> Features:
    """Per-animal PCA of the neural data (frames as samples; log1p first if asked) and one PCA of the
    stimulus features over all animals; every trial projected on them. Label-free: no stimulus and no
    other animal enters a neural PCA."""
    seconds = {"read": 0.0, "neural_pca": 0.0, "stimulus_pca": 0.0}
    cache, held = {}, 0
    neural_moments = {name: _Moments() for name in sessions}
    stimulus_moments = _Moments()

    def read(session: Session, i: int) -> tuple[np.ndarray, np.ndarray]:
        if cache[session.name][i] is not None:
            return cache[session.name][i]
        t0 = time.perf_counter()
        out = session.read(i)
        seconds["read"] += time.perf_counter() - t0
        return out

    for name, s in sessions.items():
        cache[name] = [None] * len(s)
        for i in range(len(s)):
            neural, stimulus = read(s, i)
            if len(neural) != len(stimulus):
                raise DataError(f"{name}: trial {i} has {len(neural)} neural and {len(stimulus)} stimulus "
                                "frames")
            t0 = time.perf_counter()
            neural_moments[name].add(_prepare(neural, log1p))
            seconds["neural_pca"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            stimulus_moments.add(stimulus)
            seconds["stimulus_pca"] += time.perf_counter() - t0
            if held + neural.nbytes + stimulus.nbytes <= CACHE_BYTES:
                cache[name][i] = (neural, stimulus)
                held += neural.nbytes + stimulus.nbytes
    t0 = time.perf_counter()
    stimulus_mean, stimulus_comps = stimulus_moments.pca(k)
    seconds["stimulus_pca"] += time.perf_counter() - t0
    neural_pcs, stimulus_pcs = {}, {}
    for name, s in sessions.items():
        t0 = time.perf_counter()
        mean, comps = neural_moments[name].pca(k)
        seconds["neural_pca"] += time.perf_counter() - t0
        neural_pcs[name], stimulus_pcs[name] = [], []
        for i in range(len(s)):
            neural, stimulus = read(s, i)
            t0 = time.perf_counter()
            neural_pcs[name].append((_prepare(neural, log1p) - mean) @ comps)
            seconds["neural_pca"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            stimulus_pcs[name].append((np.asarray(stimulus, np.float64) - stimulus_mean) @ stimulus_comps)
            seconds["stimulus_pca"] += time.perf_counter() - t0
    return Features(neural_pcs, stimulus_pcs, cache, seconds)


def summary_features(sessions: dict[str, Session], feats: Features, log1p: bool = False) -> dict[str, list]:
    """Per animal, per trial (T, 2 + len(SUMMARY_QUANTILES)): the mean, sd and SUMMARY_QUANTILES over the
    animal's neurons of its responses, each neuron z-scored over all frames of the animal's trials; then each
    statistic z-scored over those frames, so that all weigh alike in a correlation. No neuron's identity and
    no other animal enters: the population statistics an order-invariant encoder could read untrained.
    Two passes over the trials (feats' cache, or read again)."""
    out = {}
    for name, s in sessions.items():
        n, total, squares = 0, 0.0, 0.0
        for k in range(len(s)):
            x = feats.neural(s, k, log1p)
            n, total, squares = n + len(x), total + x.sum(0), squares + (x ** 2).sum(0)
        mean = total / n
        sd = np.sqrt(np.maximum(squares / n - mean ** 2, 0)) + 1e-12
        per_trial = []
        for k in range(len(s)):
            z = (feats.neural(s, k, log1p) - mean) / sd
            quantiles = np.quantile(z, SUMMARY_QUANTILES, axis=1)
            per_trial.append(np.column_stack([z.mean(1), z.std(1), *quantiles]))
        frames = np.concatenate(per_trial)
        centre, scale = frames.mean(0), frames.std(0) + 1e-12
        out[name] = [(x - centre) / scale for x in per_trial]
    return out


def stimulus_splits(sessions: dict[str, Session], n_splits: int,
                    rng: np.random.Generator) -> list[np.ndarray]:
    """The stimuli each split may fit on: a random half (rounded down) of the stimuli of every stratum,
    a stratum being the set of tiers a stimulus is shown in over all animals (as the permutation test's),
    so that both blocks keep scored stimuli. The fitted baselines are scored on every other trial."""
    tiers_of = defaultdict(set)
    for s in sessions.values():
        for label, tier in zip(s.labels.tolist(), s.tiers.tolist(), strict=True):
            tiers_of[label].add(tier)
    strata = defaultdict(list)
    for label in sorted(tiers_of):
        strata["+".join(sorted(tiers_of[label]))].append(label)
    splits = []
    for _ in range(n_splits):
        fit = [x for key in sorted(strata) for x in rng.permutation(strata[key])[:len(strata[key]) // 2]]
        splits.append(np.array(sorted(fit), np.int64))
    return splits


def _inverse_sqrt(c: np.ndarray, reg: float) -> np.ndarray:
    c = c + reg * np.trace(c) / len(c) * np.eye(len(c))
    values, vectors = np.linalg.eigh(c)
    return (vectors / np.sqrt(np.maximum(values, 1e-12))) @ vectors.T


@dataclass
class CCA:
    """Canonical weights of two animals: side x (T, k_x) -> (x - mean_x) @ weights_x (T, c); c = min(k_a,
    k_b) canonical variates, by decreasing canonical correlation (correlations, on the fit trials)."""

    mean_a: np.ndarray
    weights_a: np.ndarray
    mean_b: np.ndarray
    weights_b: np.ndarray
    correlations: np.ndarray

    def project(self, x: np.ndarray, side: str) -> np.ndarray:
        return (x - getattr(self, f"mean_{side}")) @ getattr(self, f"weights_{side}")


def cca_fit(a: list[np.ndarray], labels_a, b: list[np.ndarray], labels_b, stimuli,
            reg: float = CCA_REG) -> CCA:
    """CCA between two animals' per-frame features a[i] (T_i, k_a) and b[j] (T_j, k_b), fitted on their
    trials of `stimuli` that both animals were shown. Each animal's fit trials are first centred frame by
    frame (the trial-independent time course is not what is aligned, and the statistics remove it too).
    Auto-covariances come from single trials; the cross-covariance from every (A trial, B trial) pair of one
    stimulus over their common frames, i.e. the product of the two animals' means for that stimulus; each
    stimulus weighs by its frames. Whitening (ridge `reg` x mean eigenvalue) and an SVD give the weights.
    ValueError if the two animals share none of `stimuli`."""
    labels_a, labels_b = np.asarray(labels_a), np.asarray(labels_b)
    shared = np.intersect1d(np.intersect1d(labels_a, labels_b), stimuli)
    if not len(shared):
        raise ValueError("the two animals share none of the fit stimuli")
    ia, ib = np.flatnonzero(np.isin(labels_a, shared)), np.flatnonzero(np.isin(labels_b, shared))
    ca, cb = stats.centre([a[i] for i in ia]), stats.centre([b[j] for j in ib])
    ka, kb = a[0].shape[1], b[0].shape[1]
    caa, cbb, cab, frames = np.zeros((ka, ka)), np.zeros((kb, kb)), np.zeros((ka, kb)), 0
    for s in shared:
        xa = [ca[n] for n, i in enumerate(ia) if labels_a[i] == s]
        xb = [cb[n] for n, j in enumerate(ib) if labels_b[j] == s]
        t = min(len(x) for x in xa + xb)
        xa, xb = np.stack([x[:t] for x in xa]), np.stack([x[:t] for x in xb])
        caa += np.einsum("itk,itl->kl", xa, xa) / len(xa)
        cbb += np.einsum("itk,itl->kl", xb, xb) / len(xb)
        cab += xa.mean(0).T @ xb.mean(0)
        frames += t
    wa, wb = _inverse_sqrt(caa / frames, reg), _inverse_sqrt(cbb / frames, reg)
    u, corr, vt = np.linalg.svd(wa @ (cab / frames) @ wb)
    c = min(ka, kb)
    return CCA(np.concatenate([a[i] for i in ia]).mean(0), wa @ u[:, :c],
               np.concatenate([b[j] for j in ib]).mean(0), wb @ vt.T[:, :c], corr[:c])


def cebra_version() -> str | None:
    """The installed CEBRA's version, or None when `import cebra` fails."""
    try:
        import cebra
    except ImportError:
        return None
    return str(getattr(cebra, "__version__", "unknown"))


def cebra_embeddings(sessions: dict[str, Session], feats: Features, fit_stimuli: np.ndarray, dims: int,
                     seed: int, log1p: bool = False,
                     iterations: int = CEBRA_PARAMS["max_iterations"]) -> dict[str, list[np.ndarray | None]]:
    """Multi-session CEBRA-Behavior (one encoder per animal, one shared embedding): trained on every
    animal's trials of `fit_stimuli`, neural data as input and the stimulus PCs as the continuous label that
    aligns the sessions (CEBRA_PARAMS, output dimension `dims`, `iterations` steps). Returns per animal, per
    trial, the embedding (T, dims) of every trial it was not trained on (None for the others, and for an
    animal with no trial to train on)."""
    import cebra

    torch.manual_seed(seed)
    names, xs, ys = [], [], []
    for name, s in sessions.items():
        fit = np.flatnonzero(np.isin(s.labels, fit_stimuli))
        if len(fit):
            names.append(name)
            xs.append(np.concatenate([feats.neural(s, k, log1p) for k in fit]).astype(np.float32))
            ys.append(np.concatenate([feats.stimulus_pcs[name][k] for k in fit]).astype(np.float32))
    if len(names) < 2:
        raise ValueError("fewer than two animals have trials to train on")
    params = {**CEBRA_PARAMS, "max_iterations": iterations}
    model = cebra.CEBRA(**params, output_dimension=dims, device="cuda_if_available", verbose=False)
    model.fit(xs, ys)
    out = {name: [None] * len(s) for name, s in sessions.items()}
    for session_id, name in enumerate(names):
        s = sessions[name]
        for k in np.flatnonzero(~np.isin(s.labels, fit_stimuli)):
            x = feats.neural(s, k, log1p).astype(np.float32)
            out[name][k] = np.asarray(model.transform(x, session_id=session_id), np.float64)
    return out


def _result(comparisons: dict) -> dict:
    """stats.result, quiet about scipy's precision warning when a ceiling's paired r are all ~1."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        return stats.result(comparisons)


def _compare(rep_a: list, rep_b: list, sa: Session, sb: Session, n_perm: int,
             rng: np.random.Generator) -> dict | None:
    """stats.between of the trials that have a representation (not None) on each side; None if a side has
    none."""
    ia = [i for i, x in enumerate(rep_a) if x is not None]
    ib = [j for j, x in enumerate(rep_b) if x is not None]
    if not ia or not ib:
        return None
    return stats.between([rep_a[i] for i in ia], [rep_b[j] for j in ib], sa.labels[ia], sb.labels[ib],
                         sa.tiers[ia], sb.tiers[ib], n_perm, rng)


def _mean(values) -> float:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def average(results: list[dict]) -> dict:
    """Several stats.result() entries (one per split) as one: every number the mean over entries (NaN
    ignored), plus "sd" (standard deviation over entries, ddof 1) of the centred pooled SPREAD_KEYS and
    "splits" (each entry's centred pooled SPREAD_KEYS)."""
    def mean_of(items: list):
        if isinstance(items[0], dict):
            return {key: mean_of([x[key] for x in items]) for key in items[0]}
        if all(isinstance(x, int) for x in items) and len(set(items)) == 1:
            return items[0]                               # a count that every split shares stays an int
        return _mean(items)

    out = mean_of(results)
    out["sd"] = {key: float(np.std([r[key] for r in results], ddof=1)) if len(results) > 1 else float("nan")
                 for key in SPREAD_KEYS}
    out["splits"] = [{key: r[key] for key in SPREAD_KEYS} for r in results]
    return out


def describe(method: str, k: int, n_splits: int, log1p: bool) -> tuple[str, str]:
    """(what the method fits on which animals, zero-shot column) for the report."""
    responses = "log1p responses" if log1p else "responses"
    return {
        "pca_cca": (f"PCA ({k}) of each animal's own {responses}; CCA on the pair's trials of a random half "
                    f"of the stimuli, scored on the others ({n_splits} splits)", "no"),
        "cebra": (f"multi-session CEBRA-Behavior on every animal's trials of a random half of the stimuli, "
                  f"stimulus PCs as labels, scored on the others ({n_splits} splits)", "no"),
        "pca": (f"PCA ({k}) of each animal's own {responses}, no alignment (floor)", "n/a"),
        "stimulus": (f"stimulus PCs ({k}) of the video or the behaviour, no neural data (ceiling)", "n/a"),
        "summary": (f"mean, sd and {'/'.join(f'{q:.0%}' for q in SUMMARY_QUANTILES)} quantiles over the "
                    f"animal's neurons of its z-scored {responses} per frame: identity-free, nothing fitted",
                    "n/a"),
    }[method]


def zeroshot(sessions: dict[str, Session], pairs: list[tuple[str, str]], methods, n_perm: int, seed: int,
             k: int = PCS, log1p: bool = False, n_splits: int = SPLITS,
             reference: dict[str, list[np.ndarray]] | None = None,
             cebra_iterations: int = CEBRA_PARAMS["max_iterations"]) -> dict:
    """Alignment baselines scored like PNBA's zero-shot analysis: stats.between per pair of animals.

    sessions: animal -> Session; pairs: (a, b) names; methods: names in BASELINES; reference: optional
    animal -> per-trial arrays (PNBA's mu_x) scored on the fitted baselines' held-out trials of the same
    splits, so that it stands beside them on identical trials. Returns {"settings", "cebra_version",
    "seconds" (shared reading), "methods": {name: {"fits", "zero_shot", "wall_s", "skipped", "pairs": [{a, b,
    stats.result() (averaged over splits for the fitted ones, with "sd" and "splits")}]}}, "comparisons":
    {name: [centred comparisons per pair (the first split's for the fitted ones), None where not scored]}}.
    wall_s: the method's own fitting and statistics, its share of the PCA included, reading not.
    """
    unknown = [m for m in methods if m not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; valid: {', '.join(BASELINES)}")
    feats = features(sessions, k, log1p)
    fitted = [m for m in methods if m in ("pca_cca", "cebra")] + (["reference"] if reference else [])
    splits = stimulus_splits(sessions, n_splits, np.random.default_rng([seed, 0])) if fitted else []
    version = cebra_version() if "cebra" in methods else None
    out = {"settings": {"pcs": k, "log1p": log1p, "splits": n_splits, "cca_reg": CCA_REG,
                        "video_grid": list(VIDEO_GRID),
                        "cebra": {**CEBRA_PARAMS, "max_iterations": cebra_iterations}},
           "cebra_version": version, "seconds": {"read": feats.seconds["read"]}, "methods": {},
           "comparisons": {}, "fit_stimuli": [s.tolist() for s in splits]}

    def rng(method: str, pair: int, split: int = 0) -> np.random.Generator:
        return np.random.default_rng([seed, _SEED_OF[method], pair, split])

    for method in [*methods, *(["reference"] if reference else [])]:
        t0 = time.perf_counter()
        fits, zero = describe(method, k, n_splits, log1p) if method != "reference" else (
            "PNBA mu_x, scored on the fitted baselines' held-out trials (same splits)", "")
        entry = {"fits": fits, "zero_shot": zero, "skipped": None, "pairs": []}
        comparisons = []
        if method in ("pca", "stimulus", "summary"):
            rep = (summary_features(sessions, feats, log1p) if method == "summary"
                   else feats.neural_pcs if method == "pca" else feats.stimulus_pcs)
            for p, (a, b) in enumerate(pairs):
                c = _compare(rep[a], rep[b], sessions[a], sessions[b], n_perm, rng(method, p))
                entry["pairs"].append({"a": a, "b": b, **_result(c)})
                comparisons.append(c["centred"])
            wall = feats.seconds.get({"pca": "neural_pca", "stimulus": "stimulus_pca"}.get(method), 0.0)
        else:
            wall = feats.seconds["neural_pca"] if method == "pca_cca" else 0.0
            per_pair = [[] for _ in pairs]
            first = [None] * len(pairs)
            if method == "cebra" and version is None:
                entry["skipped"] = CEBRA_MISSING
            for split, fit_stimuli in enumerate(splits if entry["skipped"] is None else []):
                if method == "cebra":
                    try:
                        embedded = cebra_embeddings(sessions, feats, fit_stimuli, k, seed + split, log1p,
                                                    cebra_iterations)
                    except Exception as e:      # an optional package: report its failure, do not crash
                        entry["skipped"] = f"cebra {version}: failed ({type(e).__name__}: {e}); skipped"
                        per_pair = [[] for _ in pairs]
                        break
                for p, (a, b) in enumerate(pairs):
                    sa, sb = sessions[a], sessions[b]
                    if method == "cebra":
                        rep_a, rep_b = embedded[a], embedded[b]
                    else:
                        keep_a, keep_b = ~np.isin(sa.labels, fit_stimuli), ~np.isin(sb.labels, fit_stimuli)
                        if method == "reference":
                            source_a, source_b = reference[a], reference[b]
                        else:
                            try:
                                cca = cca_fit(feats.neural_pcs[a], sa.labels, feats.neural_pcs[b], sb.labels,
                                              fit_stimuli)
                            except ValueError:
                                continue
                            source_a = [cca.project(x, "a") for x in feats.neural_pcs[a]]
                            source_b = [cca.project(x, "b") for x in feats.neural_pcs[b]]
                        rep_a = [x if keep else None for x, keep in zip(source_a, keep_a, strict=True)]
                        rep_b = [x if keep else None for x, keep in zip(source_b, keep_b, strict=True)]
                    c = _compare(rep_a, rep_b, sa, sb, n_perm, rng(method, p, split))
                    if c is not None:
                        per_pair[p].append(_result(c))
                        first[p] = c["centred"] if first[p] is None else first[p]
            for (a, b), results in zip(pairs, per_pair, strict=True):
                entry["pairs"].append({"a": a, "b": b, **average(results)} if results else
                                      {"a": a, "b": b, "skipped": entry["skipped"] or "no split scored it"})
            comparisons = first
        entry["wall_s"] = wall + time.perf_counter() - t0
        out["methods"][method] = entry
        out["comparisons"][method] = comparisons
    return out
