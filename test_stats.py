"""Tests of stats.py, stats_crossmodal.py and stats_zeroshot.py on representation files of known structure.

pytest test_stats.py
"""

from __future__ import annotations

import itertools
import json
import os

import h5py
import numpy as np
import pytest
from scipy import stats as sps

import stats
import stats_crossmodal
import stats_zeroshot
from data import TrialRep, write_representations

LATENT = 8
TRAIN_POOL, TRAIN_PER_MOUSE = 40, 25          # train stimuli: each mouse sees 25 of a shared pool of 40
ORACLE_STIMULI, REPEATS = 4, 5                # oracle: every mouse sees each of 4 stimuli 5 times


def synthetic_trials(mice: dict[str, bool], stimulus_gain: float, template_gain: float = 3.0,
                     oracle_offset: float = 0.0, seed: int = 0) -> list[TrialRep]:
    """Trials whose mu_x = stimulus_gain * stimulus pattern + template + oracle_offset * tier pattern + noise.

    mice: name -> held out. The template is trial-independent (shared by all animals, plus an animal part);
    the tier pattern is added to oracle trials only. mu_y = stimulus pattern + video template + small noise.
    Two trials of the live_test_main tier have unknown stimulus and no video.
    """
    rng = np.random.default_rng(seed)
    n_stimuli = TRAIN_POOL + ORACLE_STIMULI
    lengths = rng.choice([32, 48], n_stimuli)
    patterns = rng.normal(size=(n_stimuli, 48, LATENT))
    common_template, video_template, tier_pattern = rng.normal(size=(3, 48, LATENT))
    trials = []
    for mouse, heldout in mice.items():
        template = template_gain * (common_template + 0.3 * rng.normal(size=(48, LATENT)))
        shows = [("train", s) for s in rng.choice(TRAIN_POOL, TRAIN_PER_MOUSE, replace=False)]
        shows += [("oracle", TRAIN_POOL + s) for s in range(ORACLE_STIMULI) for _ in range(REPEATS)]
        shows += [("live_test_main", -1), ("live_test_main", -1)]
        for trial, (tier, s) in zip(rng.permutation(len(shows)), shows, strict=True):
            n = lengths[s] if s >= 0 else 32
            mu_x = (stimulus_gain * patterns[s, :n] if s >= 0 else 0) + template[:n] \
                + oracle_offset * (tier == "oracle") * tier_pattern[:n] + rng.normal(size=(n, LATENT))
            arrays = {"mu_x": mu_x, "logvar_x": np.zeros((n, LATENT)), "mu_p": mu_x}
            if s >= 0:
                arrays["mu_y"] = patterns[s, :n] + video_template[:n] + 0.3 * rng.normal(size=(n, LATENT))
                arrays["logvar_y"] = np.zeros((n, LATENT))
            trials.append(TrialRep(mouse, tier, int(trial), int(s), int(n), heldout, arrays))
    return trials


def write(path, mice, **kw) -> str:
    write_representations(str(path), synthetic_trials(mice, **kw), {"checkpoint": "test"})
    return str(path)


MICE = {"m0": True, "m1": True, "m2": False}


def zeroshot_pair(mice, n_perm=1000, **kw) -> dict:
    """between() result of the first two mice, through the same path as stats_zeroshot."""
    trials = [t for t in synthetic_trials(mice, **kw) if t.stimulus >= 0]
    a, b = ([t for t in trials if t.mouse == m] for m in list(mice)[:2])
    return stats.between([t.arrays["mu_x"] for t in a], [t.arrays["mu_x"] for t in b],
                         [t.stimulus for t in a], [t.stimulus for t in b], [t.tier for t in a],
                         [t.tier for t in b], n_perm, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# Science: an effect is found, a template or a tier offset alone is not
# ---------------------------------------------------------------------------------------------

def test_effect_found():
    s = stats.result(zeroshot_pair(MICE, stimulus_gain=1.0))
    assert s["cohens_d"] > 1 and s["perm_p"] < 0.01
    assert s["paired_mean"] > s["unpaired_mean"] + 0.2
    assert s["perm_p"] >= 1 / 1001
    assert s["blocks"]["train"]["perm_p"] < 0.01
    # 4 oracle stimuli allow only 4! = 24 relabellings: p cannot fall far below 1/24, whatever t says
    oracle = s["blocks"]["oracle"]
    assert oracle["n_stimuli"] == ORACLE_STIMULI and oracle["t_p"] < 1e-10 and 0.02 < oracle["perm_p"] < 0.1


def test_negative_control_template_and_tier_offset():
    """No stimulus information, but a large template and an oracle-tier offset: raw r is high and the naive
    pooled tests fire (oracle repeats fill the paired set), yet the stratified permutation test does not."""
    s = stats.result(zeroshot_pair(MICE, stimulus_gain=0.0, template_gain=3.0, oracle_offset=1.5))
    assert s["raw"]["paired_mean"] > 0.8 and s["raw"]["unpaired_mean"] > 0.8
    assert s["t_p"] < 1e-3                                       # optimistic: pairs treated as independent
    assert s["perm_p"] > 0.05 and s["raw"]["perm_p"] > 0.05
    for block in stats.BLOCKS:
        assert s["blocks"][block]["perm_p"] > 0.05


def test_permutation_test_calibrated_where_naive_tests_are_not():
    """20 null data sets (tier offset, no stimulus information): the permutation test keeps its 5% level,
    Welch's t (every pair independent) rejects nearly always."""
    results = [stats.result(zeroshot_pair(MICE, n_perm=200, stimulus_gain=0.0, oracle_offset=1.5, seed=seed))
               for seed in range(20)]
    assert sum(r["perm_p"] < 0.05 for r in results) <= 3
    assert sum(r["t_p"] < 0.05 for r in results) >= 15


def test_template_trap():
    """A dominant trial-independent template: every raw r is high and nearly equal; centring separates."""
    s = stats.result(zeroshot_pair(MICE, stimulus_gain=1.0, template_gain=8.0))
    raw = s["raw"]
    assert raw["unpaired_mean"] > 0.9 and raw["paired_mean"] - raw["unpaired_mean"] < 0.05
    assert s["paired_mean"] - s["unpaired_mean"] > 0.3 and s["cohens_d"] > 1


def test_repeats_within_animal():
    trials = [t for t in synthetic_trials({"m0": True}, stimulus_gain=1.0) if t.stimulus >= 0]
    rng = np.random.default_rng(0)
    effect = stats.result(stats.within([t.arrays["mu_x"] for t in trials], [t.stimulus for t in trials],
                                       [t.tier for t in trials], 1000, rng))
    assert effect["perm_p"] < 0.01 and effect["n_paired"] == ORACLE_STIMULI * REPEATS * (REPEATS - 1) // 2
    assert effect["blocks"]["train"]["n_paired"] == 0
    trials = synthetic_trials({"m0": True}, stimulus_gain=0.0, oracle_offset=1.5)
    trials = [t for t in trials if t.stimulus >= 0]
    null = stats.result(stats.within([t.arrays["mu_x"] for t in trials], [t.stimulus for t in trials],
                                     [t.tier for t in trials], 1000, rng))
    assert null["perm_p"] > 0.05


# ---------------------------------------------------------------------------------------------
# Statistic functions against independent closed forms
# ---------------------------------------------------------------------------------------------

def test_correlation_matrix_matches_corrcoef_on_common_frames():
    rng = np.random.default_rng(1)
    a = [rng.normal(size=(n, 3)) + 2 for n in (4, 7, 5)]
    b = [rng.normal(size=(n, 3)) for n in (6, 4, 7, 2)]
    r = stats.correlation_matrix(a, b)
    for i, j in itertools.product(range(len(a)), range(len(b))):
        n = min(len(a[i]), len(b[j]))
        assert r[i, j] == pytest.approx(np.corrcoef(a[i][:n].ravel(), b[j][:n].ravel())[0, 1], abs=1e-12)


def test_centre_is_mean_over_trials_having_the_frame():
    a = [np.full((2, 1), 1.0), np.full((3, 1), 3.0)]
    centred = stats.centre(a)
    np.testing.assert_allclose(centred[0].ravel(), [-1, -1])
    np.testing.assert_allclose(centred[1].ravel(), [1, 1, 0])    # frame 2: only the second trial has it


def test_cohens_d_hand_formula():
    x, y = np.array([1.0, 2.0, 4.0]), np.array([0.0, 1.0, 1.0, 2.0])
    sx2, sy2 = ((x - x.mean()) ** 2).sum() / 2, ((y - y.mean()) ** 2).sum() / 3
    expected = (x.mean() - y.mean()) / np.sqrt((2 * sx2 + 3 * sy2) / 5)
    assert stats.cohens_d(x, y) == pytest.approx(expected)


def test_permutation_p_bounds():
    assert stats.permutation_p(np.array([5.0, 1, 2, 3])) == pytest.approx(1 / 4)   # best: 1 / (n + 1)
    assert stats.permutation_p(np.array([0.0, 1, 2, 3])) == 1.0
    assert stats.permutation_p(np.array([2.0, 1, 2, np.nan])) == pytest.approx(2 / 3)  # ties count, NaN not
    s = stats.result(zeroshot_pair(MICE, n_perm=200, stimulus_gain=3.0))
    assert s["perm_p"] == pytest.approx(1 / 201)


def test_permutation_null_matches_direct_recount():
    """The null from block sums equals recounting paired pairs after relabelling A's stimuli."""
    rng = np.random.default_rng(2)
    labels_a, labels_b = np.array([0, 0, 1, 2, 3, 3]), np.array([1, 0, 3, 3, 5])
    tiers_a = np.array(["oracle", "oracle", "train", "train", "oracle", "oracle"])
    tiers_b = np.array(["train", "oracle", "oracle", "oracle", "train"])
    r = rng.normal(size=(6, 5))
    c = stats.compare_between(r, labels_a, labels_b, tiers_a, tiers_b, 50, np.random.default_rng(3))
    perms = stats.stratified_permutations(np.array(["oracle", "train", "train", "oracle"]), 50,
                                          np.random.default_rng(3))
    groups = np.unique(labels_a)
    for row, perm in enumerate(perms):
        relabelled = groups[perm][np.searchsorted(groups, labels_a)]
        same = relabelled[:, None] == labels_b[None, :]
        assert c["pooled"].perm_sum[row] == pytest.approx(r[same].sum())
        assert c["pooled"].perm_n[row] == same.sum()
    assert c["pooled"].n_stimuli == 3 and len(c["pooled"].paired) == 2 + 1 + 4


def test_within_null_matches_direct_recount():
    """The within-animal null equals recounting same-label pairs i < j after shuffling labels within tier."""
    rng = np.random.default_rng(6)
    labels = np.array([0, 0, 1, 1, 1, 2, 3, 4, 5, 5])
    tiers = np.array(["oracle"] * 5 + ["train"] * 3 + ["live_test_main"] * 2)
    r = rng.normal(size=(10, 10))
    r = r + r.T
    c = stats.compare_within(r, labels, tiers, 50, np.random.default_rng(7))
    perms = stats.stratified_permutations(tiers, 50, np.random.default_rng(7))
    upper = np.triu(np.ones((10, 10), bool), 1)
    for row, perm in enumerate(perms):
        same = (labels[perm][:, None] == labels[perm][None, :]) & upper
        assert c["pooled"].perm_sum[row] == pytest.approx(r[same].sum())
        assert c["pooled"].perm_n[row] == same.sum()
    assert c["pooled"].total_n == 45 and len(c["pooled"].paired) == 1 + 3 + 1
    assert len(c["oracle"].paired) == 4 and c["oracle"].total_n == 10 and c["train"].n_stimuli == 0


def test_two_way_anova_balanced_closed_form():
    rng = np.random.default_rng(4)
    n_a, n_b, n = 3, 2, 6
    y = rng.normal(size=(n_a, n_b, n)) + np.array([0, 1, 3])[:, None, None] + np.array([0, 2])[None, :, None]
    result = stats.two_way_anova([[y[i, j] for j in range(n_b)] for i in range(n_a)], ("pair", "paired"))
    cell, grand = y.mean(2), y.mean()
    ss_a = n_b * n * ((y.mean((1, 2)) - grand) ** 2).sum()
    ss_b = n_a * n * ((y.mean((0, 2)) - grand) ** 2).sum()
    ss_ab = n * ((cell - y.mean((1, 2))[:, None] - y.mean((0, 2))[None, :] + grand) ** 2).sum()
    ss_e = ((y - cell[:, :, None]) ** 2).sum()
    df_e = n_a * n_b * (n - 1)
    effects = result["effects"]
    for key, ss, df in (("pair", ss_a, 2), ("paired", ss_b, 1), ("pair:paired", ss_ab, 2)):
        assert effects[key]["ss"] == pytest.approx(ss) and effects[key]["df"] == df
        assert effects[key]["p"] == pytest.approx(sps.f.sf(ss / df / (ss_e / df_e), df, df_e))
    assert result["residual"] == {"df": df_e, "ss": pytest.approx(ss_e)}


def test_two_way_anova_unbalanced_matches_full_data_regression():
    rng = np.random.default_rng(5)
    cells = [[rng.normal(size=k) + i + 2 * j for j, k in enumerate(sizes)]
             for i, sizes in enumerate([(3, 40), (5, 17), (2, 60)])]
    y = np.concatenate([v for row in cells for v in row])
    a = np.concatenate([np.full(len(v), i) for i, row in enumerate(cells) for v in row])
    b = np.concatenate([np.full(len(v), j) for row in cells for j, v in enumerate(row)])
    da = (a[:, None] == np.arange(1, 3)).astype(float)
    db = (b == 1).astype(float)[:, None]

    def rss(*cols):
        x = np.hstack([np.ones((len(y), 1)), *cols])
        return ((y - x @ np.linalg.lstsq(x, y, rcond=None)[0]) ** 2).sum()

    result = stats.two_way_anova(cells, ("pair", "paired"))
    assert result["effects"]["pair"]["ss"] == pytest.approx(rss(db) - rss(da, db))
    assert result["effects"]["paired"]["ss"] == pytest.approx(rss(da) - rss(da, db))
    assert result["effects"]["pair:paired"]["ss"] == pytest.approx(rss(da, db) - rss(da, db, da * db))


# ---------------------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------------------

SUMMARY = {"paired_mean", "unpaired_mean", "cohens_d", "perm_p", "t_p", "mwu_p", "n_paired", "n_unpaired"}


def test_crossmodal_cli(tmp_path):
    path = write(tmp_path / "reps.h5", MICE, stimulus_gain=1.0)
    assert stats_crossmodal.main([path, "--permutations", "200"]) == 0
    out = json.loads((tmp_path / "crossmodal.json").read_text())
    assert set(out["groups"]) == {"train", "heldout"}
    for group, mice in (("heldout", {"m0", "m1"}), ("train", {"m2"})):
        g = out["groups"][group]
        assert SUMMARY <= set(g) and SUMMARY <= set(g["raw"]) and set(g["blocks"]) == {"train", "oracle"}
        assert set(g["per_animal"]) == mice
        assert g["n_paired"] == len(mice) * (TRAIN_PER_MOUSE + ORACLE_STIMULI * REPEATS ** 2)
        assert g["perm_p"] < 0.01 and g["cohens_d"] > 1
    text = (tmp_path / "crossmodal.txt").read_text()
    assert "perm p" in text and "raw (uncentred" in text
    assert (tmp_path / "crossmodal.png").read_bytes()[:4] == b"\x89PNG"


def test_crossmodal_negative_control(tmp_path):
    # a fixed data seed: under the null 5% of seeds give p < 0.05 by design (calibration is tested above)
    path = write(tmp_path / "reps.h5", MICE, stimulus_gain=0.0, oracle_offset=1.5, seed=1)
    assert stats_crossmodal.main([path, "--out", str(tmp_path / "o")]) == 0
    out = json.loads((tmp_path / "o" / "crossmodal.json").read_text())
    assert all(out["groups"][g]["perm_p"] > 0.05 for g in ("train", "heldout"))


def test_zeroshot_cli_several_pairs(tmp_path):
    path = write(tmp_path / "reps.h5", MICE, stimulus_gain=1.0)
    assert stats_zeroshot.main([path, "--out", str(tmp_path / "out"), "--permutations", "200"]) == 0
    out = json.loads((tmp_path / "out" / "zeroshot.json").read_text())
    assert [(p["a"], p["b"], p["heldout"]) for p in out["pairs"]] == \
        [("m0", "m1", True), ("m0", "m2", False), ("m1", "m2", False)]
    for p in out["pairs"]:
        assert SUMMARY <= set(p) and SUMMARY <= set(p["raw"]) and set(p["blocks"]) == {"train", "oracle"}
        assert p["perm_p"] < 0.01
    assert set(out["repeats"]) == set(MICE) and out["repeats"]["m0"]["perm_p"] < 0.01
    assert set(out["anova"]["effects"]) == {"pair", "paired", "pair:paired"}
    assert {"zeroshot.txt", "zeroshot_blocks.png", "zeroshot_matrix.png"} <= set(os.listdir(tmp_path / "out"))


def test_zeroshot_one_pair_and_default_path(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "runs" / "a")
    write(tmp_path / "runs" / "a" / "reps.h5", {"m0": True, "m1": True}, stimulus_gain=1.0)
    monkeypatch.chdir(tmp_path)
    assert stats_zeroshot.main(["--permutations", "100"]) == 0
    out = json.loads((tmp_path / "runs" / "a" / "zeroshot.json").read_text())
    assert len(out["pairs"]) == 1 and out["anova"] is None
    assert "skipped: one animal pair" in (tmp_path / "runs" / "a" / "zeroshot.txt").read_text()


@pytest.mark.parametrize("script", [stats_crossmodal, stats_zeroshot])
def test_bad_input_one_line_no_output(tmp_path, capsys, monkeypatch, script):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    if script is stats_crossmodal:
        trials = synthetic_trials(MICE, stimulus_gain=1.0)
        for t in trials:
            t.arrays.pop("mu_y", None)
        unusable, problem = tmp_path / "no_video.h5", "no trials with video"
    else:
        trials = synthetic_trials({"m0": True}, stimulus_gain=1.0)
        unusable, problem = tmp_path / "one_mouse.h5", "no two animals share a stimulus"
    write_representations(str(unusable), trials, {})
    monkeypatch.chdir(tmp_path)
    cases = [([str(foreign)], "not a PNBA representations file"), ([str(tmp_path / "missing.h5")], "no such"),
             ([str(unusable)], problem), ([], "none found at runs/*/reps.h5")]
    for args, problem in cases:
        out = tmp_path / "out"
        assert script.main([*args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and problem in err and err.count("\n") == 1
        assert all(a in err for a in args)
        assert not out.exists()
