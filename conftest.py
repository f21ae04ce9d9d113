"""pytest set-up shared by the suite: Triton's mode, the markers `gpu` and `interpreter`, and the fixtures of
test_pnba.py with the helpers they need."""

import os
import shutil

# numpy's OpenBLAS reads this when numpy is first imported (torch imports it): the suite's matrices are small,
# and two BLAS threads spinning against torch's and other jobs' made a 2.8 s ridge fit take 7 s
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402 -- imports no triton: kernels/ imports it on first use

# Triton reads TRITON_INTERPRET when it is imported, and every @triton.jit kernel is then interpreted or
# compiled for the whole process. Without CUDA the interpreter is the only way to run the kernels (on CPU
# tensors), so it is set there. With CUDA it is left unset: the interpreter would copy CUDA tensors to the
# host and run the kernels in numpy, and the gpu tests would pass without a kernel ever compiled. A value
# set before pytest starts wins either way (TRITON_INTERPRET=1 runs the interpreter tests on a CUDA machine,
# and then skips the gpu ones).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")  # triton's
COMPILED_ON_CUDA = torch.cuda.is_available() and not INTERPRETED

import data  # noqa: E402 -- the project's modules after Triton's mode is chosen
import decoding  # noqa: E402
import stats  # noqa: E402
import stats_zeroshot  # noqa: E402
import train  # noqa: E402
from recordings import synthetic_nwb  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """The markers `gpu` and `interpreter` (pyproject.toml) skip a test where it cannot run as meant."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA device, with Triton compiling (TRITON_INTERPRET unset)")
    no_interpreter = pytest.mark.skip(reason="runs Triton on CPU tensors: needs TRITON_INTERPRET=1, which "
                                             "conftest.py sets only without CUDA")
    for item in items:
        if item.get_closest_marker("gpu") and not COMPILED_ON_CUDA:
            item.add_marker(no_gpu)
        if item.get_closest_marker("interpreter") and not INTERPRETED:
            item.add_marker(no_interpreter)


# ---------------------------------------------------------------------------------------------
# fixtures of test_pnba.py, and the helpers they need
# ---------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: intra-op threads only add overhead (10x when other jobs share the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_session():
    """One torch intra-op thread for the session's fixtures too (one_thread starts after them): two threads
    spin against each other and other jobs on a 2-core machine (conftest.py does the same for OpenBLAS)."""
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


@pytest.fixture(scope="session")
def tiny_data(tiny):
    """The tiny set `tiny` wrote, for training: (root, the animals to hold out)."""
    root, _, truth = tiny
    return root, truth["heldout"] + truth["control"]


def train_args(root, holdout, out, *extra):
    return ["--preset", "tiny", "--data", root, "--holdout", ",".join(holdout), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    """A short tiny run: its directory."""
    root, holdout = tiny_data
    out = tmp_path_factory.mktemp("run") / "run"
    train.train(train_args(root, holdout, out, "--run.max_steps", "4"))
    return out


def monkey_set(root):
    """A synthetic monkey set written under root: (root, its NWB files, the truth's config, the truth's
    arrays)."""
    truth = data.read_synthetic_truth(str(root))
    arrays = truth.pop("arrays")
    return str(root), sorted(str(p) for p in root.rglob("*.nwb")), truth, arrays


@pytest.fixture(scope="session")
def monkeys(tmp_path_factory):
    """The monkey preset, written once through the CLI (120 trials a session): monkey_set."""
    root = tmp_path_factory.mktemp("nwb") / "monkeys"
    assert data.main(["synth", str(root), "--preset", "monkey"]) == 0
    return monkey_set(root)


@pytest.fixture
def no_figures(monkeypatch):
    """Figures drawn as a stub: drawing is most of an analysis' time and these tests check numbers."""
    monkeypatch.setattr(stats, "histogram_figure", lambda *args: b"\x89PNG stub")
    monkeypatch.setattr(stats_zeroshot, "matrix_figure", lambda *args: b"\x89PNG stub")


@pytest.fixture
def fast_training(monkeypatch):
    """The analysis' networks trained briefly: these tests check the wiring, not the optimum."""
    monkeypatch.setattr(decoding, "TRAINING", decoding.Training(steps=40))


@pytest.fixture(scope="session")
def small_monkeys(tmp_path_factory):
    """The monkey preset at 40 trials a session (seed 1), written once, where more trials only take longer:
    monkey_set."""
    root = tmp_path_factory.mktemp("nwb-small") / "monkeys"
    synthetic_nwb.write_synthetic_nwb(str(root), seed=1, trials=40)
    return monkey_set(root)


FILTERS_MICE = (("dynamic90201-1-1", 26, "old"), ("dynamic90205-2-2", 34, "old"),
                ("dynamic90206-4-1", 30, "new"), ("dynamic90207-1-3", 22, "control"))
FILTERS_SMALL = dict(mice=FILTERS_MICE, heldout=("dynamic90205-2-2", "dynamic90206-4-1"), family="filters",
                     n_oracle_videos=3, oracle_repeats=4)


@pytest.fixture(scope="session")
def filters(tmp_path_factory):
    """A small dataset of the "filters" family (tiny sizes): (root, opened mice by name, truth)."""
    root = str(tmp_path_factory.mktemp("synth") / "filters")
    paths = data.write_synthetic(root, "tiny", seed=0, **FILTERS_SMALL)
    return root, {m.name: m for m in data.open_mice(paths)}, data.read_synthetic_truth(root)
