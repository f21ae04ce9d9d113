"""Tests of data.py against the synthetic dataset it writes (ground truth beside it)."""

import json
import os
import shutil
import subprocess
import sys
from itertools import combinations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data

TINY_TWO = (("dynamic90001-1-1", 23, "old"), ("dynamic90002-4-2", 31, "new"))


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: intra-op threads only add overhead (10x when other jobs share the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny preset, written once: (root, opened mice by name, truth)."""
    root = str(tmp_path_factory.mktemp("synth") / "tiny")
    paths = data.write_synthetic(root, "tiny", seed=0)
    mice = {m.name: m for m in data.open_mice(paths)}
    return root, mice, data.read_synthetic_truth(root)


@pytest.fixture
def broken(tiny, tmp_path):
    """A private copy of the smallest mouse folder, to damage."""
    root, mice, truth = tiny
    name = min(mice, key=lambda n: mice[n].n_neurons)
    path = str(tmp_path / name)
    shutil.copytree(os.path.join(root, name), path)
    return data.Mouse(path), truth["arrays"]


# ---------------------------------------------------------------------------------------------
# reader
# ---------------------------------------------------------------------------------------------

def test_reader_round_trips_the_writer(tiny):
    root, mice, truth = tiny
    assert sorted(mice) == sorted(truth["mice"]) and len(mice) == 5
    assert data.find_mice([root]) == sorted(os.path.join(root, n) for n in mice)   # skips _synthetic_truth
    arrays, frames_of = truth["arrays"], truth["arrays"]["stimulus_frames"]
    for name, m in mice.items():
        info, stim = truth["mice"][name], arrays[f"{name}/stimulus_of_trial"]
        assert m.n_neurons == info["neurons"] and m.coords.shape == (m.n_neurons, 3)
        assert len(m.tiers) == len(stim) and m.tiers[0] != "none"
        assert np.array_equal(m.trials(), np.flatnonzero(stim >= 0))
        for i in np.flatnonzero(stim < 0):                                   # `none` slots have no files
            assert m.tiers[i] == "none" and not os.path.exists(os.path.join(m.path, f"data/videos/{i}.npy"))
        assert sorted(os.listdir(os.path.join(m.path, "data", "responses"))) == \
            sorted(f"{i}.npy" for i in m.trials())
        assert m.hidden_tiers == info["hidden_tiers"]
        for i in m.trials():
            T = int(frames_of[stim[i]])
            assert m.valid_frames(i) == T
            r = m.raw(i)
            assert r["videos"].shape == (36, 64, T) and r["videos"].dtype == np.float32
            assert r["responses"].shape == (m.n_neurons, T) and r["behavior"].shape == (2, 52)
            assert r["pupil_center"].shape == (2, T) and isinstance(r["videos"], np.memmap)
        i = int(m.trials(["train"])[0])
        video, responses = m.normalised(i)
        assert video.shape == (48, 32, 64) and responses.shape == (48, m.n_neurons)
        assert video.dtype == responses.dtype == torch.float32
        assert 0 <= video.min() and video.max() <= 1
        raw = m.raw(i)
        expected = F.interpolate(torch.tensor(np.array(raw["videos"])).permute(2, 0, 1)[:, None] / 255,
                                 size=(32, 64), mode="bilinear", antialias=True)[:, 0]
        torch.testing.assert_close(video, expected)
        expected = torch.tensor(np.array(raw["responses"]) * m.precision[:, :48]).T
        torch.testing.assert_close(responses, expected)
        assert np.array_equal(m.trials("train"), m.trials(["train"]))


def test_std_floor_on_near_silent_neurons(tiny):
    _, mice, truth = tiny
    for name, m in mice.items():
        std = np.load(os.path.join(m.path, "meta/statistics/responses/all/std.npy"))
        assert std.shape == (m.n_neurons, 52) and not np.isnan(std).any()
        threshold = 0.01 * std.mean()
        silent = truth["arrays"][f"{name}/g"] < 1e-3
        assert silent.sum() == 2 and (std[silent] < threshold).all()
        np.testing.assert_allclose(m.precision[silent], 1 / threshold, rtol=1e-5)
        loud = std > threshold
        np.testing.assert_allclose(m.precision[loud], 1 / std[loud], rtol=1e-5)


def test_statistics_layouts(tmp_path):
    """Per-neuron statistics (N,) and (N, 1) normalise like a per-frame array that is constant in time."""
    (path, _) = data.write_synthetic(str(tmp_path / "s"), "tiny", seed=3, mice=TINY_TWO, heldout=(),
                                     stats_layout="per_neuron")
    std_file = os.path.join(path, "meta/statistics/responses/all/std.npy")
    std = np.load(std_file)
    assert std.shape == (23,)
    assert np.load(os.path.join(path, "meta/statistics/videos/all/mean.npy")).shape == ()
    m = data.Mouse(path)
    i = int(m.trials(["train"])[0])
    _, per_neuron = m.normalised(i)
    np.testing.assert_allclose(m.precision[:, 0], data.response_precision(std))
    np.save(std_file, std[:, None])
    _, column = data.Mouse(path).normalised(i)
    np.save(std_file, np.repeat(std[:, None], 52, 1))
    _, per_frame = data.Mouse(path).normalised(i)
    torch.testing.assert_close(per_neuron, column)
    torch.testing.assert_close(per_neuron, per_frame)


def test_hidden_tiers_are_excluded(tiny):
    _, mice, truth = tiny
    new = [n for n, info in truth["mice"].items() if info["kind"] == "new"]
    assert new
    for name in new:
        m = mice[name]
        assert m.hidden_tiers == sorted(data.TEST_TIERS)
        hidden = m.trials(data.TEST_TIERS)
        assert all(m.is_hidden(i) for i in hidden)
        assert not any(m.is_hidden(i) for i in m.trials(["train", "oracle"]))
        assert not set(m.trials(hidden=False)) & set(hidden)
    loader = data.make_train_loader(list(mice.values()), 8, 2, 0, seed=0, epoch=0)
    for b in loader:
        assert all(mice[b["mouse"]].tiers[i] == "train" for i in b["trial"].tolist())


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the file
# ---------------------------------------------------------------------------------------------

def one_line_error(fn, *needles):
    with pytest.raises(data.DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


def test_missing_tiers_and_not_a_mouse_folder(broken, tmp_path):
    m, _ = broken
    os.remove(os.path.join(m.path, "meta/trials/tiers.npy"))
    one_line_error(lambda: data.Mouse(m.path), "meta/trials/tiers.npy", "missing")
    one_line_error(lambda: data.find_mice([m.path]), m.path, "not a Sensorium mouse folder")
    one_line_error(lambda: data.find_mice([str(tmp_path / "nowhere")]), "no such folder")


def test_trial_shape_disagrees_with_siblings(broken):
    m, _ = broken
    i = int(m.trials()[2])
    np.save(os.path.join(m.path, f"data/videos/{i}.npy"), np.zeros((36, 64, 40), np.float32))
    one_line_error(lambda: data.Mouse(m.path).raw(i), f"data/videos/{i}.npy", "siblings")


def test_nan_inside_the_valid_window(broken):
    m, _ = broken
    i, j = (int(t) for t in m.trials(["train"])[:2])
    path = os.path.join(m.path, f"data/responses/{i}.npy")
    r = np.load(path)
    r[3, 10] = np.nan
    np.save(path, r)
    one_line_error(lambda: data.Mouse(m.path).raw(i), path, "NaN at frame 10")
    one_line_error(lambda: data.Mouse(m.path).normalised(i, 8, 16), path, "NaN at frame 10")
    path = os.path.join(m.path, f"data/videos/{j}.npy")
    v = np.load(path)
    v[0, 0, 5] = np.nan                                      # a hole in the trace used to find the padding
    np.save(path, v)
    one_line_error(lambda: data.Mouse(m.path).valid_frames(j), path, "NaN at frame 5")


def test_neuron_count_disagrees(broken):
    m, _ = broken
    i = int(m.trials()[1])
    path = os.path.join(m.path, f"data/responses/{i}.npy")
    np.save(path, np.load(path)[:-1])
    one_line_error(lambda: data.Mouse(m.path).raw(i), path, "neurons")
    std_path = os.path.join(m.path, "meta/statistics/responses/all/std.npy")
    np.save(std_path, np.load(std_path)[:-1])
    one_line_error(lambda: data.Mouse(m.path), std_path, "neurons")


def test_unreadable_npy(broken):
    m, _ = broken
    i = int(m.trials()[1])
    path = os.path.join(m.path, f"data/videos/{i}.npy")
    with open(path, "wb") as f:
        f.write(b"not an npy file")
    one_line_error(lambda: data.Mouse(m.path).raw(i), path, "unreadable .npy")


def test_cli_errors_are_one_line_with_nonzero_exit(broken, tmp_path, capsys):
    m, _ = broken
    os.remove(os.path.join(m.path, "meta/trials/tiers.npy"))
    assert data.main(["check", m.path]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and m.path in err
    assert data.main(["synth", m.path, "--preset", "tiny"]) == 2                    # not an empty folder
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_exit_status_from_the_shell(tmp_path):
    p = subprocess.run([sys.executable, "data.py", "check", str(tmp_path)], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.abspath(data.__file__)))
    assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1
    assert p.stderr.startswith(f"error: {tmp_path}: not a Sensorium mouse folder")


# ---------------------------------------------------------------------------------------------
# stimulus identity
# ---------------------------------------------------------------------------------------------

def check_pairing(root, mice, truth):
    groups = data.stimulus_groups(mice)
    for p in truth["pairs"]:
        assert [list(q) for q in data.pairs(groups, p["a"], p["b"])] == p["trials"]
    for name, expected in truth["repeats"].items():
        assert data.repeats(groups, name) == expected
    return groups


def test_pairing_recovers_truth(tiny):
    root, mice, truth = tiny
    groups = check_pairing(root, list(mice.values()), truth)
    stim = {n: truth["arrays"][f"{n}/stimulus_of_trial"] for n in mice}
    assert len(set(groups.values())) == len({s for n in mice for s in stim[n] if s >= 0})
    assert len(truth["pairs"]) == len(list(combinations(mice, 2)))
    assert all(len(p["train_trials"]) == 6 for p in truth["pairs"])            # n_shared_train


def test_pairing_with_grey_level_jitter(tmp_path):
    root = str(tmp_path / "jitter")
    paths = data.write_synthetic(root, "tiny", seed=1, mice=TINY_TWO + (("dynamic90003-2-7", 40, "old"),),
                                 heldout=(), video_jitter=1)
    mice = [data.Mouse(p) for p in paths]
    truth = data.read_synthetic_truth(root)
    a, b = mice[0], mice[1]
    (i, j), = [(i, j) for i, j in truth["pairs"][0]["train_trials"][:1]]
    diff = np.array(a.raw(i)["videos"]) - np.array(b.raw(j)["videos"])
    assert 0 < np.abs(diff).max() <= 2                        # copies differ: the tolerant match is tested
    check_pairing(root, mice, truth)


def test_pairing_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    (path,) = data.write_synthetic(str(tmp_path / "c"), "tiny", seed=2, mice=TINY_TWO[:1], heldout=())
    m = data.Mouse(path)
    before = data.stimulus_groups([m])
    cache = os.path.join(path, ".pnba_stimulus_cache.npz")
    assert os.path.isfile(cache)
    monkeypatch.setattr(data, "_thumbnail", lambda v: pytest.fail("cache not used"))
    assert data.stimulus_groups([m]) == before
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    i, j = (int(t) for t in m.trials(["train"])[:2])                   # make j show i's video
    assert before[(m.name, i)] != before[(m.name, j)]
    shutil.copyfile(os.path.join(path, f"data/videos/{i}.npy"), os.path.join(path, f"data/videos/{j}.npy"))
    os.utime(os.path.join(path, f"data/videos/{j}.npy"), ns=(1, 1))
    after = data.stimulus_groups([m])
    assert after[(m.name, i)] == after[(m.name, j)]
    # a read-only data folder: the cache goes to the user's cache dir
    save = data._save_npz

    def read_only(p, arrays):
        if p.startswith(path):
            raise PermissionError(p)
        save(p, arrays)

    os.remove(cache)
    monkeypatch.setattr(data, "_save_npz", read_only)
    assert data.stimulus_groups([m]) == after
    assert not os.path.exists(cache) and len(os.listdir(tmp_path / "user-cache" / "pnba")) == 1


# ---------------------------------------------------------------------------------------------
# synthetic writer and CLI
# ---------------------------------------------------------------------------------------------

def tree_bytes(root):
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if not f.startswith(".pnba"):
                with open(os.path.join(folder, f), "rb") as fh:
                    out[os.path.relpath(os.path.join(folder, f), root)] = fh.read()
    return out


def test_same_seed_same_bytes(tiny, tmp_path, capsys):
    root, _, truth = tiny
    assert data.main(["synth", str(tmp_path / "again"), "--preset", "tiny", "--seed", "0"]) == 0
    assert tree_bytes(str(tmp_path / "again")) == tree_bytes(root)
    other = data.write_synthetic(str(tmp_path / "other"), "tiny", seed=1, mice=TINY_TWO, heldout=())
    first_video = [os.path.join(data.find_mice([r])[0], "data/videos/0.npy") for r in (root, other[0])]
    assert np.load(first_video[0]).shape == np.load(first_video[1]).shape
    assert not np.array_equal(np.load(first_video[0]), np.load(first_video[1]), equal_nan=True)
    assert truth["heldout"] and len(truth["heldout"]) >= 2 and truth["control"] and truth["train"]
    assert not set(truth["heldout"]) & set(truth["control"])


def test_check_json_reports_tiers_and_pairs(tiny, capsys):
    root, mice, truth = tiny
    assert data.main(["check", root, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    name = truth["train"][0]
    info = report["mice"][name]
    assert info["neurons"] == mice[name].n_neurons
    assert info["tiers"]["train"] == 9 and info["tiers"]["none"] == 2
    assert info["valid_frames"] == {"38": 2, "48": 17} and info["hidden_tiers"] == []
    assert report["pairs"] == [{k: p[k] for k in ("a", "b", "trials")} for p in truth["pairs"]]
    assert report["repeats"] == truth["repeats"]
    assert data.main(["check", root]) == 0
    text = capsys.readouterr().out
    assert "same video in" in text and name in text


# ---------------------------------------------------------------------------------------------
# windows
# ---------------------------------------------------------------------------------------------

def windows(loader):
    return [(b["mouse"], i, int(s)) for b in loader
            for i, s in zip(b["trial"].tolist(), b["index"][:, 0], strict=True)]


def test_train_loader_batches(tiny):
    _, mice, truth = tiny
    train = [mice[n] for n in truth["train"]]
    batches = list(data.make_train_loader(train, 8, 4, 0, seed=0, epoch=0))
    assert len(batches) == data.train_batches_per_epoch(train, 4) == 4     # 9 train trials -> 2 per mouse
    assert [b["mouse"] for b in batches] == [m.name for m in train] * 2     # one mouse per batch, cycling
    for b in batches:
        m = mice[b["mouse"]]
        assert b["video"].shape == (4, 1, 8, 32, 64) and b["video"].dtype == torch.float32
        assert b["responses"].shape == (4, 8, m.n_neurons) and b["responses"].dtype == torch.float32
        assert b["index"].dtype == b["trial"].dtype == torch.int64 and b["trial"].shape == (4,)
        assert len(set(b["trial"].tolist())) == 4
        for k, (i, index) in enumerate(zip(b["trial"].tolist(), b["index"], strict=True)):
            start = int(index[0])
            assert torch.equal(index, torch.arange(start, start + 8)) and start + 8 <= m.valid_frames(i)
            video, responses = m.normalised(i)
            torch.testing.assert_close(b["video"][k, 0], video[start:start + 8])
            torch.testing.assert_close(b["responses"][k], responses[start:start + 8])


def test_train_loader_ddp_shards_and_determinism(tiny):
    _, mice, truth = tiny
    train = [mice[n] for n in truth["train"]]
    whole = set(windows(data.make_train_loader(train, 8, 2, 0, seed=5, epoch=3)))
    shards = [windows(data.make_train_loader(train, 8, 2, 0, seed=5, epoch=3, rank=r, world=2))
              for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 2 * data.train_batches_per_epoch(train, 2, 0, 2)
    assert not set(shards[0]) & set(shards[1]) and set(shards[0]) | set(shards[1]) <= whole
    a = list(data.make_train_loader(train, 8, 2, 0, seed=5, epoch=3))
    b = list(data.make_train_loader(train, 8, 2, 2, seed=5, epoch=3))               # 2 worker processes
    assert all(torch.equal(x["video"], y["video"]) and torch.equal(x["responses"], y["responses"])
               and torch.equal(x["index"], y["index"]) for x, y in zip(a, b, strict=True))
    resumed = data.make_train_loader(train, 8, 2, 0, seed=5, epoch=3, start_batch=3)
    assert len(resumed) == len(a) - 3 and windows(resumed) == windows(a[3:])
    assert windows(data.make_train_loader(train, 8, 2, 0, seed=5, epoch=4)) != windows(a)
    assert windows(data.make_train_loader(train, 8, 2, 0, seed=6, epoch=3)) != windows(a)


def test_eval_windows_cover_every_frame_once(tiny):
    _, mice, truth = tiny
    m = mice[truth["train"][0]]
    video, responses = m.normalised(int(m.trials(["train"])[0]))
    w = data.eval_windows(m, int(m.trials(["train"])[0]), 16)
    assert w["video"].shape == (3, 1, 16, 32, 64) and w["responses"].shape == (3, 16, m.n_neurons)
    assert w["keep"].all() and w["covered"] == w["valid_frames"] == 48
    torch.testing.assert_close(w["video"][:, 0].reshape(48, 32, 64), video)
    bonus = int(m.trials(["live_test_bonus"])[0])                         # 38 frames: windows 0, 16, then 22
    w = data.eval_windows(m, bonus, 16)
    assert w["index"][:, 0].tolist() == [0, 16, 22] and w["covered"] == 38
    assert sorted(w["index"][w["keep"]].tolist()) == list(range(38))
    torch.testing.assert_close(w["responses"][w["keep"]], m.normalised(bonus)[1])
    assert data.eval_windows(m, bonus, 40)["video"].shape[0] == 0


# ---------------------------------------------------------------------------------------------
# the science the data carries
# ---------------------------------------------------------------------------------------------

def ridge_r2(m, truth):
    """R² of a ridge map from normalised responses at t to the stimulus latent z(t - lag), fitted on half of
    the stimuli, tested on the other half; and the same with every trial paired with another stimulus's z."""
    arrays, lag = truth["arrays"], truth["lag"]
    stim = arrays[f"{m.name}/stimulus_of_trial"]
    trials = [int(i) for i in m.trials(hidden=False) if m.valid_frames(i) == 48]
    trials.sort(key=lambda i: stim[i])
    X = np.concatenate([m.normalised(i)[1].numpy()[lag:] for i in trials])
    X = np.hstack([X, np.ones((len(X), 1))])
    test = np.repeat([stim[i] % 2 == 1 for i in trials], 48 - lag)
    shuffled = np.roll([stim[i] for i in trials], len(trials) // 2)
    return [_ridge_r2(X, np.concatenate([arrays["z"][s, :, :48 - lag].T for s in stims]), test)
            for stims in ([stim[i] for i in trials], shuffled)]


def _ridge_r2(X, Y, test):
    fit = ~test
    W = np.linalg.solve(X[fit].T @ X[fit] + 1.0 * np.eye(X.shape[1]), X[fit].T @ Y[fit])
    resid = ((Y[test] - X[test] @ W) ** 2).sum(0)
    return float(np.mean(1 - resid / ((Y[test] - Y[test].mean(0)) ** 2).sum(0)))


def test_responses_carry_the_shared_latent_and_the_control_does_not(tiny):
    _, mice, truth = tiny
    for name in truth["train"] + truth["heldout"]:
        r2, r2_shuffled = ridge_r2(mice[name], truth)
        assert r2 > 0.5 and r2 - r2_shuffled > 0.4, (name, r2, r2_shuffled)
    for name in truth["control"]:
        assert ridge_r2(mice[name], truth)[0] < 0.1
