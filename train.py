"""Train PNBA: demo on a laptop, the paper's configuration on one or many GPUs.

    python train.py                                 # demo: writes synthetic data, minutes on 2 CPU cores
    python train.py --data /data/sensorium --preset paper --holdout dynamic29228,dynamic29755
    torchrun --standalone --nproc_per_node=8 train.py --data /data/sensorium --preset paper
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        train.py --data /data/sensorium --preset paper      # multi-node; node_rank=1 on the other node
    python train.py --resume runs/RUN                       # continue a run exactly where it stopped
    python train.py --out runs/RUN --restart                # start over; the old run moves to RUN.old-<time>

Any config field can be overridden, e.g. `--optim.lr 3e-4 --model.neural_projector set`
(see config.py or README "Config reference"). A run directory holds config.json, metrics.jsonl,
last.pt and epoch_<E>.pt checkpoints. The config, the run directory and the data are checked before
anything is written; a run directory is never overwritten.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import baselines
import config
import data
import kernels
import pnba
import stats

DEMO_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_synth")


class TrainError(Exception):
    """A run that cannot go on: one line saying why."""


# ------------------------------------------------------------------------------------------------
# set-up
# ------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Any config field is an override, e.g. --optim.lr 3e-4 --model.neural_projector set; "
               "--help-config lists them all with type, default and meaning.\n"
               "example: python train.py --data /data/sensorium --preset recommended --holdout dynamic29228",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help=f"{' | '.join(config.PRESETS)} (default: demo)")
    p.add_argument("--data", nargs="+", default=None,
                   help="Sensorium mouse folders or a folder holding them, or .nwb files or folders holding "
                        "them (default: the synthetic set of --data.synth_preset)")
    p.add_argument("--holdout", default=None,
                   help="comma-separated animals that take no gradient: mouse or session names, NWB subjects "
                        "(every session of that monkey) or unique name prefixes")
    p.add_argument("--help-config", action="store_true", help="list every --section.field override and exit")
    p.add_argument("--out", default=None, help="run directory (default: a new folder under runs/)")
    p.add_argument("--resume", default=None, help="run directory (or checkpoint) to continue")
    p.add_argument("--restart", action="store_true",
                   help="start over in an existing --out (the old run moves to DIR.old-<time>, not deleted)")
    return p.parse_known_args(argv)


def resume_checkpoint(resume):
    """--resume takes a run directory (its last.pt) or a checkpoint file."""
    return os.path.join(resume, "last.pt") if os.path.isdir(resume) else resume


def build_config(args, rest):
    """Config from (resumed checkpoint | preset) + command-line overrides, validated as a whole."""
    ckpt = None
    if args.resume:
        path = resume_checkpoint(args.resume)
        ckpt = pnba.load_checkpoint(path)
        cfg = config.from_dict(ckpt["config"])
        if args.preset:
            raise TrainError(f"{path}: --preset cannot change a resumed run; override single fields instead")
    else:
        cfg = config.preset(args.preset or "demo")
    cfg, unknown = config.parse_overrides(cfg, rest)
    if unknown:
        raise TrainError(f"unknown arguments {' '.join(unknown)}; config keys look like --optim.lr 3e-4")
    if args.data:
        cfg.data.paths = tuple(args.data)
    if args.holdout is not None:
        cfg.data.holdout = tuple(h for h in args.holdout.split(",") if h)
    return config.validate(cfg), ckpt


def resolve_data(cfg, rank):
    """The animals of the run (training, held out); writes the synthetic dataset of data.synth_preset if no
    data was named. --holdout names an animal, a subject (every session of an NWB monkey) or a unique
    prefix of an animal's name."""
    if not cfg.data.paths:
        root = os.path.join(DEMO_DATA, cfg.data.synth_preset)
        if rank == 0 and not os.path.isdir(root):
            print(f"writing the synthetic {cfg.data.synth_preset} dataset to {root} ...")
            data.write_synthetic_dataset(root, preset=cfg.data.synth_preset, seed=cfg.run.seed)
        if dist.is_initialized():
            dist.barrier()
        cfg.data.paths = (root,)
        if not cfg.data.holdout:
            truth = data.read_synthetic_truth(root)
            cfg.data.holdout = tuple(truth["heldout"]) + tuple(truth["control"])
    mice = data.mice_from_config(cfg.data)
    data.check_stimulus(mice, cfg.model.stimulus)
    names = [m.name for m in mice]
    heldout = set()
    for h in cfg.data.holdout:
        hits = [m.name for m in mice if h in (m.name, m.subject)]
        if not hits:
            hits = [n for n in names if n.startswith(h)]
            if len(hits) != 1:
                raise TrainError(f"--holdout {h!r} matches {len(hits)} of the animals {', '.join(names)}")
        heldout.update(hits)
    train_mice = [m for m in mice if m.name not in heldout]
    if not train_mice:
        raise TrainError("every mouse is held out: nothing to train on")
    return train_mice, [m for m in mice if m.name in heldout]


def setup_distributed():
    """(rank, world, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python runs one process."""
    if "RANK" not in os.environ:
        return 0, 1, None
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank) if use_cuda else None


def plan_run_dir(args, rank, world) -> str:
    """Where this run writes, decided and checked before anything is written, the same on every rank.

    A folder that holds files is never overwritten: --out on one is refused unless the run is continued
    (--resume) or started over (--restart: set_up_run_dir moves the old run aside, never deletes it).
    """
    verdict = [args.out, None]
    if rank == 0:
        try:
            verdict[0] = _run_dir(args)
            config.check_writable(verdict[0])
        except (TrainError, config.ConfigError) as e:
            verdict[1] = str(e)
    if world > 1:    # rank 0 alone looks: a rank that looked later could find the folder rank 0 made
        dist.broadcast_object_list(verdict, src=0)
    if verdict[1]:
        raise TrainError(verdict[1])
    return verdict[0]


def _run_dir(args) -> str:
    if args.resume:
        out = os.path.dirname(os.path.abspath(resume_checkpoint(args.resume)))
        if args.restart:
            raise TrainError("--resume continues a run and --restart starts one over: choose one")
        if args.out and os.path.abspath(args.out) != out:
            raise TrainError(f"--resume continues {out} in place; --out {args.out} cannot move it")
        return out
    out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{args.preset or 'demo'}")
    held = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if held and not args.restart:
        files = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise TrainError(f"{out}: already holds a run ({files}); continue it with --resume {out}, or start "
                         f"over with --restart (the old run is moved to {out.rstrip(os.sep)}.old-<time>, "
                         "never deleted)")
    return out


def set_up_run_dir(out_dir, args, cfg, step) -> None:
    """Make the run directory ready (rank 0, once the config, data and model are known to be good).
    --restart: the old run is moved to <out>.old-<time> first. Resuming: temp files a killed save left
    are removed, and metrics.jsonl is cut back to the checkpoint's step (the lines after it would be
    replayed). Then config.json."""
    if args.restart and os.path.isdir(out_dir) and os.listdir(out_dir):
        stamp = f"{out_dir.rstrip(os.sep)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        aside, k = stamp, 1
        while os.path.exists(aside):            # two restarts within a second
            k += 1
            aside = f"{stamp}-{k}"
        os.rename(out_dir, aside)
        print(f"moved the old run in {out_dir} to {aside}")
    os.makedirs(out_dir, exist_ok=True)
    config.remove_stale_temps(out_dir)
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if args.resume and os.path.exists(metrics):
        kept = []
        with open(metrics) as f:
            for line in f:
                with contextlib.suppress(ValueError):      # a line cut short by the kill is dropped too
                    if json.loads(line)["step"] <= step:
                        kept.append(line)
        config.write_atomic(metrics, "".join(kept))
    config.write_atomic(os.path.join(out_dir, "config.json"), json.dumps(config.to_dict(cfg), indent=2))


def build_model(cfg, train_mice, device):
    """The model for the training animals, seeded by run.seed, on device."""
    torch.manual_seed(cfg.run.seed)
    try:
        model = pnba.PNBA(cfg.model, {m.name: m.n_neurons for m in train_mice})
    except ValueError as e:     # the settings are validated; what is left is about the animals
        raise TrainError(str(e)) from None
    model.materialise(cfg.data.frames)
    if cfg.model.readout_bias_init == "mean":
        for m in train_mice:
            if m.mean_rate is None:
                raise TrainError(f"{m.path}: no meta/statistics/responses/all/mean.npy for "
                                 "--model.readout_bias_init mean")
            model.neural_readout.init_bias(m.name, m.mean_rate)
    return model.to(device)


def restore(ckpt, source, model, optimizer, scheduler) -> int:
    """Continue a run exactly: weights, optimiser, scheduler and RNG states. Returns the step."""
    missing = [k for k in ("optimizer", "scheduler", "rng_cpu", "rng_cuda", "step") if k not in ckpt]
    if missing:
        raise pnba.CheckpointError(f"{source}: not a training checkpoint (no {', '.join(missing)}); it "
                                   "cannot be resumed")
    pnba.load_weights(model, ckpt, source)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng_cpu"])
    if torch.cuda.is_available() and ckpt["rng_cuda"]:
        torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
    return int(ckpt["step"])


def align_scale(cfg, step):
    """Weight of the alignment terms (KL, matching) at `step`: a linear ramp from 0 to 1.

    Without it the demo collapses: the alignment terms penalise x/y mismatch by (mu_x - mu_y)^2 / var,
    so the cheapest answer is the same constant latent for every trial, reached before the
    reconstruction terms have made the latents informative (README, "Collapse").
    """
    if cfg.optim.align_warmup_iters <= 0:
        return 1.0
    return min(1.0, step / cfg.optim.align_warmup_iters)


def make_optimizer(model, cfg):
    """AdamW; the per-animal readout parameters get lr * readout_lr_scale. They take a gradient only on
    their own animal's steps (a quarter of them with four animals), so at the shared lr they move a
    quarter as far as everything else."""
    readout = [p for n, p in model.named_parameters() if n.startswith(pnba.PER_ANIMAL_PARAMETERS)]
    shared = [p for n, p in model.named_parameters() if not n.startswith(pnba.PER_ANIMAL_PARAMETERS)]
    groups = [{"params": shared, "lr": cfg.optim.lr}]
    if readout:
        groups.append({"params": readout, "lr": cfg.optim.lr * cfg.optim.readout_lr_scale})
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                             weight_decay=cfg.optim.weight_decay)


def make_scheduler(optimizer, cfg, total_steps):
    """Linear warm-up from lr*warmup_ratio, lr held for stable_fraction of the remaining steps, then
    cosine decay to min_lr (the published schedule: stable_fraction 0)."""
    warmup = max(1, min(cfg.optim.warmup_iters, total_steps // 2))
    stable = int(cfg.optim.stable_fraction * (total_steps - warmup))
    sched = torch.optim.lr_scheduler
    phases = [sched.LinearLR(optimizer, start_factor=cfg.optim.warmup_ratio, total_iters=warmup)]
    if stable > 0:
        phases.append(sched.ConstantLR(optimizer, factor=1.0, total_iters=stable))
    phases.append(sched.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup - stable),
                                          eta_min=cfg.optim.min_lr))
    milestones = [warmup, warmup + stable] if stable > 0 else [warmup]
    return sched.SequentialLR(optimizer, phases, milestones=milestones)


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------

def batch_to(batch, device):
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


VAL_TRAIN_TRIALS = 16     # train-tier trials per animal in the alignment metrics (most widely shared videos)
VAL_PERMUTATIONS = 200    # stimulus permutations per validation test (the stats scripts use 1000)


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


def prepare_validation(train_mice, heldout_mice) -> ValidationSet:
    mice = train_mice + heldout_mice
    stimulus = data.stimulus_groups(mice)
    seen_by = Counter(stimulus.values())        # how many trials, over all animals, show each video
    trials, scored, ceiling, ridge = {}, {}, {}, {}
    for m in mice:
        oracle = [int(i) for i in m.trials(["oracle"], hidden=False)]
        train_tier = [int(i) for i in m.trials(["train"], hidden=False)]
        widest = sorted(train_tier, key=lambda i: (-seen_by[stimulus[(m.name, i)]], stimulus[(m.name, i)]))
        trials[m.name] = oracle + widest[:VAL_TRAIN_TRIALS]
        if m in train_mice and oracle:
            scored[m.name] = oracle
            labels = [stimulus[(m.name, i)] for i in oracle]
            responses = [m.normalised(i)[1].numpy() for i in oracle]
            ceiling[m.name] = stats.repeat_ceiling(responses, labels)
            fit = baselines.pixel_ridge(m, train_tier)
            ridge[m.name] = float(np.nanmean(stats.per_neuron_corr(
                np.concatenate([fit.predict(m, i) for i in oracle]), np.concatenate(responses))))
    return ValidationSet(trials, scored, stimulus, ceiling, ridge)


VAL_CHUNK = 64           # windows per forward pass in validation


def _in_chunks(fn, x: torch.Tensor, state: torch.Tensor | None, mouse: str) -> torch.Tensor:
    """fn(chunk, mouse, state chunk) over x (W, ...) and state (W, ...) or None in chunks of VAL_CHUNK
    windows, concatenated: eval-mode outputs do not depend on which windows share a batch, and batched passes
    are many times faster than one window at a time."""
    return torch.cat([fn(x[k:k + VAL_CHUNK], mouse, None if state is None else state[k:k + VAL_CHUNK])
                      for k in range(0, len(x), VAL_CHUNK)])


def _stack(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if not tensors or tensors[0] is None else torch.cat(tensors)


def _encode_trials(model, modality: str, inputs: list[torch.Tensor], states=None, **kwargs) -> list:
    """model.encode(**{modality: windows}, **kwargs) over every trial's windows at once, in chunks; one
    Gaussians per trial (modality "responses" or "stimulus"). states: per trial the windows' behavioural
    states (W, T, state_dim), or None."""
    if not inputs:
        return []
    stacked, state = torch.cat(inputs), _stack(states or [None])
    parts = [model.encode(**{modality: stacked[k:k + VAL_CHUNK]}, **kwargs,
                          state=None if state is None else state[k:k + VAL_CHUNK])
             for k in range(0, len(stacked), VAL_CHUNK)]
    sizes = [len(x) for x in inputs]
    fields = [torch.cat(f).split(sizes) if f[0] is not None else [None] * len(sizes)
              for f in zip(*parts, strict=True)]
    return [pnba.Gaussians(*trial) for trial in zip(*fields, strict=True)]


def _mean_corr(prediction, target):
    return float(np.nanmean(stats.per_neuron_corr(prediction.numpy(), target.numpy())))


def _mean(values):
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


@torch.no_grad()
def validate(model, vset: ValidationSet, train_mice, heldout_mice, cfg, device, seed=0) -> dict:
    """The three things PNBA claims, on trials fixed for the run (eval mode: means, no sampling).

    - stimulus -> neural: Sensorium single-trial correlation of the stimulus path's rates (mu_y decoded)
      on the training animals' oracle trials, next to the fused path, the data's repeat ceiling and the
      pixel ridge on the same trials; Poisson NLL of the fused path over its constant-rate floor;
    - cross-modal: centred r(mu_x, mu_y) same video vs other videos (d, permutation p), training and
      held-out animals (held-out: mu_x zero-shot); identification of the video from mu_x;
    - zero-shot: centred and raw r(mu_x A, mu_x B) same vs other stimulus for every held-out pair;
    plus latent_corr, the raw correlation between the latents of different trials (collapse alarm).
    """
    model.eval()
    rng = np.random.default_rng(seed)
    frames = cfg.data.frames
    # a video is the same for every trial that shows it: encoded once per stimulus id. Behaviour is the
    # trial's own (two reaches to one target differ), so it is encoded per trial
    stimulus_cache = {}                 # key -> (windows Gaussians, per-frame mu_y, logvar_y)
    reps, per_animal = {}, {}
    for m in train_mice + heldout_mice:
        trained, coords = m in train_mice, m.coords_tensor(device)
        reps[m.name], predictions, fused, targets = [], [], [], []
        reads_state = cfg.model.state_input != "none"
        windows = {i: data.eval_windows(m, i, frames, reads_state) for i in vset.trials[m.name]}   # read once
        responses = {i: w["responses"].to(device) for i, w in windows.items()}
        states = {i: None if w["state"] is None else w["state"].to(device) for i, w in windows.items()}
        all_states = _stack(list(states.values()))
        x_stats = model.neural_statistics(torch.cat(list(responses.values())).split(VAL_CHUNK), coords=coords,
                                          states=None if all_states is None else all_states.split(VAL_CHUNK),
                                          animal=m.name)
        gx_of = dict(zip(windows, _encode_trials(model, "responses", list(responses.values()),
                                                 list(states.values()), coords=coords, x_stats=x_stats,
                                                 animal=m.name), strict=True))
        key_of = {i: vset.stimulus[(m.name, i)] if m.stimulus_kind == "video" else (m.name, i)
                  for i in windows}
        new = {key_of[i]: i for i in windows if key_of[i] not in stimulus_cache}
        stimuli = [windows[i]["stimulus"].to(device) for i in new.values()]
        for key, gy in zip(new, _encode_trials(model, "stimulus", stimuli), strict=True):
            keep = windows[new[key]]["keep"].reshape(-1)
            stimulus_cache[key] = (gy, pnba.per_frame(gy.mu_y, keep), pnba.per_frame(gy.logvar_y, keep))
        scored = [i for i in windows if trained and i in vset.scored.get(m.name, ())]
        for i, w in windows.items():
            keep, gx = w["keep"].reshape(-1), gx_of[i]
            gy, mu_y, logvar_y = stimulus_cache[key_of[i]]
            reps[m.name].append(data.TrialRep(m.name, str(m.tiers[i]), i, vset.stimulus[(m.name, i)],
                                              w["valid_frames"], not trained, {
                "mu_x": pnba.per_frame(gx.mu_x, keep), "logvar_x": pnba.per_frame(gx.logvar_x, keep),
                "mu_y": mu_y, "logvar_y": logvar_y}))
        if scored:
            gys = [stimulus_cache[key_of[i]][0] for i in scored]
            mu_y = [gy.mu_y for gy in gys]
            mu_p = [kernels.poe(*(t.flatten(1) for t in (gx_of[i].mu_x, gx_of[i].logvar_x, gy.mu_y,
                                                         gy.logvar_y)))[0].view_as(gy.mu_y)
                    for i, gy in zip(scored, gys, strict=True)]
            scored_state = _stack([states[i] for i in scored])
            for latents, out in ((mu_y, predictions), (mu_p, fused)):
                rates = _in_chunks(model.decode_responses, torch.cat(latents), scored_state, m.name)
                out += [r.flatten(0, 1)[windows[i]["keep"].reshape(-1)].float().cpu()
                        for i, r in zip(scored, rates.split([len(z) for z in latents]), strict=True)]
            targets = [windows[i]["responses"].flatten(0, 1)[windows[i]["keep"].reshape(-1)] for i in scored]
        a = {}
        if predictions:
            target = torch.cat(targets)
            a["corr"] = _mean_corr(torch.cat(predictions), target)
            a["corr_fused"] = _mean_corr(torch.cat(fused), target)
            a["poisson_vs_floor"] = float(pnba.poisson_nll(torch.cat(fused)[None], target[None])
                                          / pnba.poisson_floor(target[None]) - 1)
            a["ceiling"], a["ridge_corr"] = vset.ceiling[m.name], vset.ridge[m.name]
        candidates = {t.stimulus: (t.arrays["mu_y"], t.arrays["logvar_y"]) for t in reps[m.name]}
        scored = [t for t in reps[m.name] if t.tier == "oracle"] or reps[m.name]
        ident = stats.identification(scored, candidates)
        a["identification_top1"], a["identification_chance"] = ident["top1"], ident["chance"]
        per_animal[m.name] = a

    def crossmodal(group):
        results = []
        for m in group:
            r = reps[m.name]
            labels, tiers = [t.stimulus for t in r], [t.tier for t in r]
            results.append(stats.between([t.arrays["mu_x"] for t in r], [t.arrays["mu_y"] for t in r],
                                         labels, labels, tiers, tiers, VAL_PERMUTATIONS, rng))
        if not results:
            return None
        pooled = stats.combine(results)
        centred, raw = stats.summarise(pooled["centred"]["pooled"]), stats.summarise(pooled["raw"]["pooled"])
        return {"d": centred["cohens_d"], "p": centred["perm_p"], "paired_r": centred["paired_mean"],
                "unpaired_r": centred["unpaired_mean"], "raw_d": raw["cohens_d"]}

    zeroshot = []
    for k, a in enumerate(heldout_mice):
        for b in heldout_mice[k + 1:]:
            ra, rb = reps[a.name], reps[b.name]
            c = stats.between([t.arrays["mu_x"] for t in ra], [t.arrays["mu_x"] for t in rb],
                              [t.stimulus for t in ra], [t.stimulus for t in rb], [t.tier for t in ra],
                              [t.tier for t in rb], VAL_PERMUTATIONS, rng)
            centred, raw = stats.summarise(c["centred"]["pooled"]), stats.summarise(c["raw"]["pooled"])
            zeroshot.append({"a": a.name, "b": b.name, "d": centred["cohens_d"], "p": centred["perm_p"],
                             "raw_d": raw["cohens_d"]})
    first_windows = torch.stack([torch.as_tensor(t.arrays["mu_x"][:frames]) for r in reps.values() for t in r
                                 if len(t.arrays["mu_x"]) >= frames])
    model.train()
    scored_animals = [per_animal[m.name] for m in train_mice if "corr" in per_animal[m.name]]
    corr, ceiling = _mean(a["corr"] for a in scored_animals), _mean(a["ceiling"] for a in scored_animals)
    return {
        "corr_train_animals": corr, "corr_fused": _mean(a["corr_fused"] for a in scored_animals),
        "ceiling": ceiling,
        "fraction_of_ceiling": corr / ceiling if np.isfinite(ceiling) and ceiling > 0 else float("nan"),
        "ridge_corr": _mean(a["ridge_corr"] for a in scored_animals),
        "poisson_vs_floor": _mean(a["poisson_vs_floor"] for a in scored_animals),
        "crossmodal_train": crossmodal(train_mice), "crossmodal_heldout": crossmodal(heldout_mice),
        "identification_top1": _mean(per_animal[m.name]["identification_top1"] for m in train_mice),
        "identification_chance": _mean(per_animal[m.name]["identification_chance"] for m in train_mice),
        "zeroshot": zeroshot,
        "latent_corr": pnba.between_trial_corr(first_windows), "per_animal": per_animal}


# ------------------------------------------------------------------------------------------------
# checkpoints and the end of an epoch
# ------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What the loop and its helpers share, set up once."""
    cfg: config.Config
    out_dir: str
    model: torch.nn.Module               # the bare model (not the DDP wrapper)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_mice: list
    heldout_mice: list
    device: torch.device
    vset: ValidationSet | None = None

    @property
    def metrics_path(self):
        return os.path.join(self.out_dir, "metrics.jsonl")


def save_checkpoint(path, run: Run, state: dict):
    pnba.save_checkpoint(path, {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "config": config.to_dict(run.cfg),
        "neuron_counts": dict(run.model.neuron_counts),
        "mice": {m.name: m.n_neurons for m in run.train_mice + run.heldout_mice},
        "heldout": sorted(m.name for m in run.heldout_mice),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        **state,
    })


def end_of_epoch(run: Run, step, epoch, epoch_done, done):
    """Validate every run.val_every epochs and at the end, then write last.pt (and epoch_<E>.pt every
    run.ckpt_every epochs). The validation line goes out before the checkpoint of its step: resuming cuts
    the metrics back to the checkpoint's step, so a line is never lost or repeated."""
    cfg, e = run.cfg, epoch + 1 if epoch_done else epoch
    if cfg.run.val_every and ((epoch_done and e % cfg.run.val_every == 0) or done):
        val = validate(run.model, run.vset, run.train_mice, run.heldout_mice, cfg, run.device)
        _append_jsonl(run.metrics_path, {"step": step, "epoch": e, "val": val})
        tqdm.write(f"epoch {e} step {step}: {validation_line(val)}")
    state = {"step": step, "epoch": e}
    save_checkpoint(os.path.join(run.out_dir, "last.pt"), run, state)
    if epoch_done and cfg.run.ckpt_every and e % cfg.run.ckpt_every == 0:
        save_checkpoint(os.path.join(run.out_dir, f"epoch_{e}.pt"), run, state)


def report_done(run: Run, step):
    """The learning curves, and where everything is."""
    out_dir, metrics_path = run.out_dir, run.metrics_path
    curves = os.path.join(out_dir, "curves.png")
    config.write_atomic(curves, stats.learning_curve_figure(_read_jsonl(metrics_path),
                                                            os.path.basename(os.path.abspath(out_dir))))
    print(f"\ndone: {step} steps. run directory {out_dir}\n"
          f"  config       {os.path.join(out_dir, 'config.json')}\n"
          f"  metrics      {metrics_path}\n"
          f"  curves       {curves}\n"
          f"  checkpoint   {os.path.join(out_dir, 'last.pt')}\n"
          "next:\n"
          f"  python extract.py --ckpt {os.path.join(out_dir, 'last.pt')}\n"
          f"  python stats_crossmodal.py {os.path.join(out_dir, 'reps.h5')}\n"
          f"  python stats_zeroshot.py {os.path.join(out_dir, 'reps.h5')}")


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------

def train(argv=None):
    """Run training; returns the run directory. argv defaults to sys.argv[1:]."""
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    if args.help_config:
        print(config.help_text())
        return None
    rank, world, ddp_device = setup_distributed()
    master = rank == 0
    try:
        # everything is checked before anything is written: config, run directory, device, data
        cfg, ckpt = build_config(args, rest)
        out_dir = plan_run_dir(args, rank, world)
        device = config.pick_device(cfg.run.device, ddp_device)
        train_mice, heldout_mice = resolve_data(cfg, rank)
        data.check_run_data(train_mice, heldout_mice, cfg.data.frames, cfg.model.state_input)
        if ckpt is not None:
            pnba.check_mice(ckpt, {m.name: m.n_neurons for m in train_mice + heldout_mice},
                            source=args.resume)
        per_epoch = data.train_batches_per_epoch(train_mice, cfg.data.batch_size, rank, world)
        if per_epoch == 0:
            raise TrainError(f"no training windows: batch size {cfg.data.batch_size} is larger than "
                             f"every mouse's train tier")
        total_steps = per_epoch * cfg.optim.epochs

        raw_model = build_model(cfg, train_mice, device)
        optimizer = make_optimizer(raw_model, cfg)
        scheduler = make_scheduler(optimizer, cfg, total_steps)
        step = 0 if ckpt is None else restore(ckpt, args.resume, raw_model, optimizer, scheduler)
        # one mouse per batch: the other mice's decoder heads get no gradient in that step
        model = raw_model if world == 1 else DDP(raw_model, device_ids=[device.index] if device.type == "cuda"
                                                 else None, find_unused_parameters=True)
        run = Run(cfg, out_dir, raw_model, optimizer, scheduler, train_mice, heldout_mice, device)
        if master:
            set_up_run_dir(out_dir, args, cfg, step)
            print(f"run {out_dir}: {len(train_mice)} training animals, {len(heldout_mice)} held out "
                  f"({', '.join(m.name for m in heldout_mice) or 'none'}); {per_epoch} steps/epoch x "
                  f"{world} rank(s); device {device}")
            run.vset = prepare_validation(train_mice, heldout_mice) if cfg.run.val_every else None
            if run.vset is not None and step == 0:    # the untrained model: where every learning curve starts
                untrained = validate(raw_model, run.vset, train_mice, heldout_mice, cfg, device)
                _append_jsonl(run.metrics_path, {"step": 0, "epoch": 0, "val": untrained})
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if (device.type == "cuda" and cfg.run.amp) \
            else contextlib.nullcontext()

        stop_at = cfg.run.max_steps or total_steps
        nonfinite = 0
        start_epoch, start_batch = divmod(step, per_epoch)
        bar = tqdm(total=stop_at, initial=step, disable=not master, dynamic_ncols=True)
        model.train()
        t_log, windows_log = time.time(), 0
        for epoch in range(start_epoch, cfg.optim.epochs):
            if step >= stop_at:
                break
            loader = data.make_train_loader(train_mice, cfg.data.frames, cfg.data.batch_size,
                                            cfg.data.num_workers, cfg.run.seed, epoch, rank, world,
                                            start_batch=start_batch if epoch == start_epoch else 0,
                                            state=cfg.model.state_input != "none")
            for batch in loader:
                batch = batch_to(batch, device)
                mouse = next(m for m in train_mice if m.name == batch["mouse"])
                with amp:
                    out = model(batch["responses"], batch["stimulus"], batch["mouse"],
                                coords=mouse.coords_tensor(device), align_scale=align_scale(cfg, step),
                                observed=batch.get("observed"), state=batch.get("state"))
                loss = out.losses.total
                finite = torch.isfinite(loss.detach()).float()
                if world > 1:  # every rank must skip together, or DDP hangs in backward
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if finite.item() < 1:
                    nonfinite += 1
                    warnings.warn(f"step {step}: non-finite loss ({loss.item()}), step skipped "
                                  f"({nonfinite} in a row)", stacklevel=1)
                    optimizer.zero_grad(set_to_none=True)
                    if nonfinite >= cfg.optim.max_nonfinite:
                        raise TrainError(f"{nonfinite} non-finite losses in a row at step {step}: "
                                         f"lower --optim.lr or enable --optim.grad_clip")
                    continue
                nonfinite = 0
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                windows_log += batch["responses"].shape[0] * world
                bar.update(1)
                if master and (step % cfg.run.log_every == 0 or step == stop_at):
                    dt = time.time() - t_log
                    rec = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                           **{k: float(v.detach()) for k, v in out.losses._asdict().items()},
                           "poisson_floor": float(pnba.poisson_floor(batch["responses"])),
                           "latent_corr": pnba.between_trial_corr(out.gaussians.mu_x),
                           "windows_per_s": windows_log / max(dt, 1e-9)}
                    _append_jsonl(run.metrics_path, rec)
                    bar.set_postfix(loss=f"{rec['total']:.4g}", win_s=f"{rec['windows_per_s']:.0f}")
                    t_log, windows_log = time.time(), 0
                if step >= stop_at:
                    break
            epoch_done, done = step % per_epoch == 0 and step > 0, step >= stop_at
            if master and (epoch_done or done):
                end_of_epoch(run, step, epoch, epoch_done, done)
            if done:
                break
        bar.close()
        if world > 1:
            check_replicas(raw_model, master)
        if master:
            report_done(run, step)
        del model, raw_model, optimizer, run
        return out_dir
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def check_replicas(model, master):
    """DDP keeps every rank's weights identical; verify it once at the end rather than trust it."""
    digest = torch.stack([p.detach().double().sum() for p in model.parameters()])  # NCCL: on device
    gathered = [torch.zeros_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, digest)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise TrainError("DDP replicas diverged: the ranks hold different weights")
    if master:
        print(f"replicas identical on {len(gathered)} ranks")


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


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _append_jsonl(path, rec):
    with open(path, "a") as f:
        f.write(json.dumps(stats.jsonable(rec)) + "\n")


def main(argv=None):
    try:
        train(argv)
    except (TrainError, data.DataError, config.ConfigError, pnba.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
