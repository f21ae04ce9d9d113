"""Training, checkpoints, DDP, extraction: end-to-end on the tiny synthetic dataset."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

import data
import extract
import pnba
import train

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth") / "tiny")
    data.write_synthetic(root, "tiny", seed=0)
    truth = data.read_synthetic_truth(root)
    return root, truth["heldout"] + truth["control"]


def _train_args(root, holdout, out, *extra):
    return ["--preset", "tiny", "--data", root, "--holdout", ",".join(holdout), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    """A short tiny run: its directory."""
    root, holdout = tiny_data
    out = tmp_path_factory.mktemp("run") / "run"
    train.train(_train_args(root, holdout, out, "--run.max_steps", "4"))
    return out


def _assert_run_files(run):
    """Exactly the files of one writer: config, metrics, last and per-epoch checkpoints, no temp files."""
    files = set(os.listdir(run))
    assert {"config.json", "last.pt", "metrics.jsonl"} <= files
    assert all(f in ("config.json", "last.pt", "metrics.jsonl") or
               (f.startswith("epoch_") and f.endswith(".pt")) for f in files), files


def _params(ckpt_path):
    return torch.load(ckpt_path, weights_only=True)["model"]


def test_run_directory_and_metrics(tiny_run):
    _assert_run_files(tiny_run)
    lines = [json.loads(s) for s in open(tiny_run / "metrics.jsonl")]
    steps = [r for r in lines if "val" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        for key in ("total", "poisson", "poisson_cross", "video", "video_cross", "kl_fusion", "kl_cross",
                    "match", "poisson_floor", "latent_corr", "windows_per_s", "lr"):
            assert key in r and r[key] is not None and np.isfinite(r[key]), key
    val = [r["val"] for r in lines if "val" in r][-1]
    assert -1 <= val["corr_train_animals"] <= 1 and np.isfinite(val["psnr_heldout_animals"])
    ckpt = torch.load(tiny_run / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and set(ckpt["heldout"]) <= set(ckpt["mice"])
    assert set(ckpt["neuron_counts"]).isdisjoint(ckpt["heldout"])


def test_resume_is_exact(tiny_data, tmp_path):
    """2k steps straight == k steps, stop, resume for k more: identical parameters."""
    root, holdout = tiny_data
    train.train(_train_args(root, holdout, tmp_path / "straight", "--run.max_steps", "6"))
    train.train(_train_args(root, holdout, tmp_path / "split", "--run.max_steps", "3"))
    train.train(["--resume", str(tmp_path / "split"), "--run.max_steps", "6"])
    a, b = _params(tmp_path / "straight" / "last.pt"), _params(tmp_path / "split" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_for_other_neuron_counts_is_refused(tiny_run, tmp_path, capsys):
    ckpt = torch.load(tiny_run / "last.pt", weights_only=True)
    mouse = next(iter(ckpt["neuron_counts"]))
    ckpt["neuron_counts"][mouse] += 1
    ckpt["mice"][mouse] += 1
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    assert train.main(["--resume", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and mouse in err[0] and "neurons" in err[0] and str(bad) in err[0]
    assert extract.main(["--ckpt", str(bad), "--out", str(tmp_path / "r.h5")]) == 2
    assert not (tmp_path / "r.h5").exists()


def test_non_finite_loss_is_skipped(tiny_data, tmp_path, monkeypatch):
    root, holdout = tiny_data
    forward, calls = pnba.PNBA.forward, []

    def nan_on_second_call(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if not self.training:        # validation
            return out
        calls.append(1)
        if len(calls) == 2:
            return out._replace(losses=out.losses._replace(total=out.losses.total * float("nan")))
        return out

    monkeypatch.setattr(pnba.PNBA, "forward", nan_on_second_call)
    with pytest.warns(UserWarning, match="non-finite loss"):
        train.train(_train_args(root, holdout, tmp_path / "a", "--run.max_steps", "2"))
    assert torch.load(tmp_path / "a" / "last.pt", weights_only=True)["step"] == 2
    assert len(calls) == 3          # one skipped batch, two steps taken


def test_repeated_non_finite_loss_aborts(tiny_data, tmp_path, monkeypatch, capsys):
    root, holdout = tiny_data
    forward = pnba.PNBA.forward

    def always_nan(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        return out._replace(losses=out.losses._replace(total=out.losses.total * float("nan")))

    monkeypatch.setattr(pnba.PNBA, "forward", always_nan)
    with pytest.warns(UserWarning):
        code = train.main(_train_args(root, holdout, tmp_path / "a", "--optim.max_nonfinite", "3"))
    assert code == 2 and "3 non-finite losses in a row" in capsys.readouterr().err


def test_unknown_config_key_is_rejected(capsys):
    assert train.main(["--optim.learning_rate", "1"]) == 2
    err = capsys.readouterr().err
    assert "optim.learning_rate" in err and "optim.lr" in err


@pytest.mark.slow
def test_ddp_two_ranks_gloo(tiny_data, tmp_path):
    """torchrun with 2 CPU ranks: replicas stay identical, only rank 0 writes, clean exit."""
    root, holdout = tiny_data
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "train.py"),
           *_train_args(root, holdout, out, "--optim.epochs", "3", "--run.max_steps", "3")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "replicas identical" in proc.stdout
    _assert_run_files(out)
    steps = [json.loads(s)["step"] for s in open(out / "metrics.jsonl") if '"val"' not in s]
    assert steps == [1, 2, 3]                                   # one writer: no duplicated lines
    assert not os.path.exists(tmp_path / "runs")


def test_extract_writes_every_trial_with_responses(tiny_run, tiny_data, tmp_path):
    root, holdout = tiny_data
    out = tmp_path / "reps.h5"
    assert extract.main(["--ckpt", str(tiny_run / "last.pt"), "--out", str(out)]) == 0
    trials, attrs = data.read_representations(str(out))
    mice = {m.name: m for m in data.open_mice([root])}
    expected = {(m.name, int(i)) for m in mice.values() for i in m.trials() if not m.is_hidden(int(i))}
    assert {(t.mouse, t.trial) for t in trials} == expected
    model_cfg = torch.load(tiny_run / "last.pt", weights_only=True)["config"]["model"]
    latent = model_cfg["z_channels"] * (model_cfg["proj_neurons"] // 4 ** (len(model_cfg["ch_mult"]) - 1))
    for t in trials:
        m = mice[t.mouse]
        assert t.heldout == (t.mouse in holdout) and t.valid_frames == m.valid_frames(t.trial)
        assert t.tier == m.tiers[t.trial]
        for name in data.REPS_ARRAYS:
            assert t.arrays[name].shape[0] == t.valid_frames and t.arrays[name].dtype == np.float32
            assert t.arrays[name].shape[1] == latent
    assert attrs["checkpoint_sha256"] == extract.file_digest(str(tiny_run / "last.pt"))
    groups = data.stimulus_groups(list(mice.values()))
    assert all(t.stimulus == groups[(t.mouse, t.trial)] for t in trials)


def test_extract_bad_inputs(tiny_run, tmp_path, capsys):
    out = tmp_path / "r.h5"
    assert extract.main(["--ckpt", str(tiny_run / "last.pt"), "--out", str(out), "--tiers", "nonsense"]) == 2
    assert "nonsense" in capsys.readouterr().err and not out.exists()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert extract.main(["--ckpt", str(junk), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(junk) in err[0] and not out.exists()


def test_stats_refuse_foreign_hdf5(tmp_path, capsys):
    import stats_zeroshot
    foreign = tmp_path / "x.h5"
    with h5py.File(foreign, "w") as f:
        f["a"] = np.zeros(3)
    assert stats_zeroshot.main([str(foreign), "--out", str(tmp_path / "o")]) == 2
    assert "not a PNBA representations file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
