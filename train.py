"""Train PNBA: demo on a laptop, the paper's configuration on one or many GPUs.

    python train.py                                 # demo: writes synthetic data, minutes on 2 CPU cores
    python train.py --data /data/sensorium --preset paper --holdout dynamic29228,dynamic29755
    torchrun --standalone --nproc_per_node=8 train.py --data /data/sensorium --preset paper
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        train.py --data /data/sensorium --preset paper      # multi-node; node_rank=1 on the other node
    python train.py --resume runs/RUN                       # continue a run exactly where it stopped
    python train.py --out runs/RUN --restart                # start over; the old run moves to RUN.old-<time>
    torchrun --standalone --nproc_per_node=8 --max-restarts=3 train.py --preset paper --data /data/sensorium \
        --out runs/RUN --resume auto     # elastic: a restarted job (a lost worker) continues from last.pt

Any config field can be overridden, e.g. `--optim.lr 3e-4 --model.neural_projector set`
(see config.py or README "Config reference"). A run directory holds config.json, metrics.jsonl,
last.pt and epoch_<E>.pt checkpoints. The config, the run directory and the data are checked before
anything is written; a run directory is never overwritten.

Faults (README "Multi-GPU"): `--resume auto` continues the run in --out if it holds one and starts it
otherwise, so one command line serves every start of an elastic job (a job torchrun restarts continues its
own run even without it). A rank that fails stops every rank with one line, and a collective waits at
most run.collective_timeout_s. A checkpoint is written whole or not at all: on a full disk the previous one
stays loadable. A damaged checkpoint is named, with the newest loadable one of its run directory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import config
import data
import evaluate
import pnba
import rundir
import stats
from distributed import Ranks, check_replicas, rank_rng_states, setup_distributed
from rundir import TrainError

DEMO_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_synth")


        # else the others may wait in a collective this rank never joins: main() leaves at once (os._exit),
        # which closes the connections so that their collectives fail rather than wait


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
    p.add_argument("--resume", default=None,
                   help="run directory (or checkpoint) to continue; auto: continue the run in --out if it "
                        "holds one, start it otherwise (one command line for every start of an elastic job)")
    p.add_argument("--restart", action="store_true",
                   help="start over in an existing --out (the old run moves to DIR.old-<time>, not deleted)")
    return p.parse_known_args(argv)


def resolve_data(cfg, rank, ranks=None):
    """The animals of the run (training, held out); writes the synthetic dataset of data.synth_preset if no
    data was named (rank 0; the others wait for it at ranks.agree). --holdout names an animal, a subject
    (every session of an NWB monkey) or a unique prefix of an animal's name."""
    if not cfg.data.paths:
        root = os.path.join(DEMO_DATA, cfg.data.synth_preset)
        error = None
        if rank == 0 and not os.path.isdir(root):
            print(f"writing the synthetic {cfg.data.synth_preset} dataset to {root} ...")
            try:
                data.write_synthetic_dataset(root, preset=cfg.data.synth_preset, seed=cfg.run.seed)
            except Exception as e:          # noqa: BLE001 -- every rank learns of it at agree()
                error = e
        if ranks is not None:
            ranks.agree(error)
        elif error is not None:
            raise error
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


def restore(ckpt, source, model, optimizer, scheduler, rank=0, world=1) -> int:
    """Continue a run exactly: weights, optimiser, scheduler and RNG states (under torchrun every rank its
    own, when the checkpoint has one per rank of this many). Returns the step."""
    missing = [k for k in rundir.TRAINING_KEYS if k not in ckpt]
    if missing:
        raise pnba.CheckpointError(f"{source}: not a training checkpoint (no {', '.join(missing)}); it "
                                   "cannot be resumed")
    pnba.load_weights(model, ckpt, source)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    per_rank = ckpt.get("rng_ranks")
    if per_rank and len(per_rank) == world:
        torch.set_rng_state(per_rank[rank]["cpu"])
        if torch.cuda.is_available() and per_rank[rank]["cuda"] is not None:
            torch.cuda.set_rng_state(per_rank[rank]["cuda"])
        return int(ckpt["step"])
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
    ranks: Ranks
    per_epoch: int                       # optimiser steps per epoch on every rank
    module: torch.nn.Module | None = None    # what the loop calls: the DDP wrapper, or the model itself
    vset: evaluate.ValidationSet | None = None
    run_id: str = ""                     # config.json's; every checkpoint carries it
    rng_ranks: list | None = None        # torchrun: every rank's RNG states at the checkpoint's step
    nonfinite: int = 0                   # non-finite losses in a row
    pending: TrainError | None = None    # rank 0's metrics line that could not be written

    @property
    def metrics_path(self):
        return os.path.join(self.out_dir, "metrics.jsonl")

    @property
    def master(self) -> bool:
        return self.ranks.rank == 0

    @property
    def stop_at(self) -> int:
        return self.cfg.run.max_steps or self.per_epoch * self.cfg.optim.epochs


def save_checkpoint(path, run: Run, state: dict):
    """Write a checkpoint whole or not at all (pnba.save_checkpoint): on a full disk or a write error the
    previous file of that name is untouched and the run stops with one line saying so."""
    try:
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
            "run_id": run.run_id,
            **({"rng_ranks": run.rng_ranks} if run.rng_ranks else {}),
            **state,
        })
    except OSError as e:
        kept = "the previous one is intact" if os.path.exists(path) else "nothing was written"
        raise TrainError(f"{path}: checkpoint not written ({e.strerror or e}); {kept}: make room, then "
                         f"continue with --resume {run.out_dir}") from None


def end_of_epoch(run: Run, step, epoch, epoch_done, done):
    """Validate every run.val_every epochs and at the end, then write last.pt (and epoch_<E>.pt every
    run.ckpt_every epochs). The validation line goes out before the checkpoint of its step: resuming cuts
    the metrics back to the checkpoint's step, so a line is never lost or repeated."""
    cfg, e = run.cfg, epoch + 1 if epoch_done else epoch
    if cfg.run.val_every and ((epoch_done and e % cfg.run.val_every == 0) or done):
        val = evaluate.validate(run.model, run.vset, run.train_mice, run.heldout_mice, cfg.data.frames,
                                run.device)
        rundir.append_jsonl(run.metrics_path, {"step": step, "epoch": e, "val": val})
        tqdm.write(f"epoch {e} step {step}: {evaluate.validation_line(val)}")
    state = {"step": step, "epoch": e}
    save_checkpoint(os.path.join(run.out_dir, "last.pt"), run, state)
    if epoch_done and cfg.run.ckpt_every and e % cfg.run.ckpt_every == 0:
        save_checkpoint(os.path.join(run.out_dir, f"epoch_{e}.pt"), run, state)


def report_done(run: Run, step):
    """The learning curves, and where everything is."""
    out_dir, metrics_path = run.out_dir, run.metrics_path
    curves = os.path.join(out_dir, "curves.png")
    config.write_atomic(curves, stats.learning_curve_figure(rundir.read_jsonl(metrics_path),
                                                            os.path.basename(os.path.abspath(out_dir))))
    reps = os.path.join(out_dir, "reps.h5")
    print(f"\ndone: {step} steps. run directory {out_dir}\n"
          f"  config       {os.path.join(out_dir, 'config.json')}\n"
          f"  metrics      {metrics_path}\n"
          f"  curves       {curves}\n"
          f"  checkpoint   {os.path.join(out_dir, 'last.pt')}\n"
          "next:\n"
          f"  python extract.py --ckpt {os.path.join(out_dir, 'last.pt')}\n"
          f"  python stats_crossmodal.py {reps}\n"
          f"  python stats_zeroshot.py {reps}\n"
          f"  python stats_baselines.py {reps}\n"
          f"  python adapt.py --ckpt {os.path.join(out_dir, 'last.pt')}")


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------

def set_up(args, cfg, ckpt, ranks: Ranks, ddp_device) -> tuple[Run, int]:
    """Everything checked before anything is written (run directory, device, data, model), then the run
    directory made ready and the untrained model validated (rank 0). Returns the run and its first step."""
    rank, world = ranks.rank, ranks.world
    out_dir = rundir.plan_run_dir(args, rank, world)
    device = config.pick_device(cfg.run.device, ddp_device)
    train_mice, heldout_mice = resolve_data(cfg, rank, ranks)
    data.check_run_data(train_mice, heldout_mice, cfg.data.frames, cfg.model.state_input)
    if ckpt is not None:
        pnba.check_mice(ckpt, {m.name: m.n_neurons for m in train_mice + heldout_mice}, source=args.resume)
    per_epoch = data.train_batches_per_epoch(train_mice, cfg.data.batch_size, rank, world)
    if per_epoch == 0:
        raise TrainError(f"no training windows: batch size {cfg.data.batch_size} is larger than "
                         f"every mouse's train tier")
    model = build_model(cfg, train_mice, device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, per_epoch * cfg.optim.epochs)
    step = 0 if ckpt is None else restore(ckpt, args.resume, model, optimizer, scheduler, rank, world)
    ranks.agree()                   # the set-up held on every rank, or every rank stops here
    ranks.agreeable = False
    run = Run(cfg, out_dir, model, optimizer, scheduler, train_mice, heldout_mice, device, ranks, per_epoch,
              run_id=(ckpt or {}).get("run_id") or uuid.uuid4().hex)
    # one mouse per batch: the other mice's decoder heads get no gradient in that step
    run.module = model if world == 1 else DDP(model, device_ids=[device.index] if device.type == "cuda"
                                              else None, find_unused_parameters=True)
    ranks.agreeable = True          # rank 0 alone until agree(): a failure reaches the others there
    if run.master:
        start_run_dir(run, args, step)
    ranks.agree()
    ranks.agreeable = False
    return run, step


def start_run_dir(run: Run, args, step: int) -> None:
    """Rank 0: warnings about skipped recordings, the run directory, the validation set and the untrained
    model's validation (where every learning curve starts)."""
    animals = run.train_mice + run.heldout_mice
    for m in animals:
        if getattr(m, "skipped_line", None) and m.skipped_line():
            print(f"warning: {m.skipped_line()}", file=sys.stderr)
    rundir.set_up_run_dir(run.out_dir, args, run.cfg, step, rundir.run_records(run.run_id, animals))
    if step:
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
        print(f"continuing {run.out_dir} from step {step}" + (f" (torchrun restart {restarts})"
                                                              if restarts else ""))
    print(f"run {run.out_dir}: {len(run.train_mice)} training animals, {len(run.heldout_mice)} held out "
          f"({', '.join(m.name for m in run.heldout_mice) or 'none'}); {run.per_epoch} steps/epoch x "
          f"{run.ranks.world} rank(s); device {run.device}")
    if run.cfg.run.val_every:
        run.vset = evaluate.prepare_validation(run.train_mice, run.heldout_mice)
        if step == 0:
            untrained = evaluate.validate(run.model, run.vset, run.train_mice, run.heldout_mice,
                                          run.cfg.data.frames, run.device)
            rundir.append_jsonl(run.metrics_path, {"step": 0, "epoch": 0, "val": untrained})


def train_step(run: Run, batch: dict, step: int, amp):
    """One optimiser step on one batch; returns the model's output, or None when the loss was not finite
    on some rank (every rank then skips the step together, or DDP hangs in backward)."""
    cfg, optimizer = run.cfg, run.optimizer
    batch = batch_to(batch, run.device)
    mouse = next(m for m in run.train_mice if m.name == batch["mouse"])
    with amp:
        out = run.module(batch["responses"], batch["stimulus"], batch["mouse"],
                         coords=mouse.coords_tensor(run.device), align_scale=align_scale(cfg, step),
                         observed=batch.get("observed"), state=batch.get("state"))
    loss = out.losses.total
    finite = torch.isfinite(loss.detach()).float()
    if run.ranks.world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    optimizer.zero_grad(set_to_none=True)
    if finite.item() < 1:
        return None
    loss.backward()
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.module.parameters(), cfg.optim.grad_clip)
    optimizer.step()
    run.scheduler.step()
    return out


def step_record(run: Run, out, batch: dict, step: int, epoch: int, windows_per_s: float) -> dict:
    """A metrics.jsonl line: the loss terms, the constant-rate floor and the collapse alarm."""
    return {"step": step, "epoch": epoch, "lr": run.scheduler.get_last_lr()[0],
            **{k: float(v.detach()) for k, v in out.losses._asdict().items()},
            "poisson_floor": float(pnba.poisson_floor(batch["responses"])),
            "latent_corr": pnba.between_trial_corr(out.gaussians.mu_x), "windows_per_s": windows_per_s}


def run_epoch(run: Run, epoch: int, step: int, start_batch: int, bar, amp) -> int:
    """The steps of one epoch from batch start_batch, up to run.stop_at; returns the step reached. A
    metrics line rank 0 could not write is kept in run.pending: raised at the epoch's end, where every rank
    learns of it."""
    cfg = run.cfg
    t_log, windows_log = time.time(), 0
    loader = data.make_train_loader(run.train_mice, cfg.data.frames, cfg.data.batch_size,
                                    cfg.data.num_workers, cfg.run.seed, epoch, run.ranks.rank,
                                    run.ranks.world, start_batch=start_batch,
                                    state=cfg.model.state_input != "none")
    for batch in loader:
        out = train_step(run, batch, step, amp)
        if out is None:
            run.nonfinite += 1
            warnings.warn(f"step {step}: non-finite loss, step skipped ({run.nonfinite} in a row)",
                          stacklevel=1)
            if run.nonfinite >= cfg.optim.max_nonfinite:        # on every rank at once (all-reduced)
                run.ranks.everyone_fails()
                raise TrainError(f"{run.nonfinite} non-finite losses in a row at step {step}: "
                                 f"lower --optim.lr or enable --optim.grad_clip")
            continue
        run.nonfinite, step = 0, step + 1
        windows_log += batch["responses"].shape[0] * run.ranks.world
        bar.update(1)
        if run.master and (step % cfg.run.log_every == 0 or step == run.stop_at):
            rec = step_record(run, out, batch, step, epoch, windows_log / max(time.time() - t_log, 1e-9))
            try:
                rundir.append_jsonl(run.metrics_path, rec)
            except TrainError as e:
                run.pending = run.pending or e
            bar.set_postfix(loss=f"{rec['total']:.4g}", win_s=f"{rec['windows_per_s']:.0f}")
            t_log, windows_log = time.time(), 0
        if step >= run.stop_at:
            break
    return step


def train(argv=None):
    """Run training; returns the run directory. argv defaults to sys.argv[1:]."""
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    if args.help_config:
        print(config.help_text())
        return None
    # the config (and --resume auto's choice) on every rank before the ranks meet: nothing is written yet
    rundir.resolve_resume(args)
    cfg, ckpt = rundir.build_config(args, rest)
    rank, world, ddp_device = setup_distributed(cfg.run.collective_timeout_s)
    ranks, ok, bar = Ranks(rank, world), False, None
    try:
        run, step = set_up(args, cfg, ckpt, ranks, ddp_device)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if (run.device.type == "cuda" and cfg.run.amp) \
            else contextlib.nullcontext()
        start_epoch, start_batch = divmod(step, run.per_epoch)
        bar = tqdm(total=run.stop_at, initial=step, disable=not run.master, dynamic_ncols=True)
        run.module.train()
        for epoch in range(start_epoch, cfg.optim.epochs):
            if step >= run.stop_at:
                break
            step = run_epoch(run, epoch, step, start_batch if epoch == start_epoch else 0, bar, amp)
            epoch_done, done = step % run.per_epoch == 0 and step > 0, step >= run.stop_at
            if epoch_done or done:
                run.rng_ranks = rank_rng_states(world)
                ranks.agreeable = True      # rank 0 alone until agree()
                if run.pending is not None:
                    raise run.pending
                if run.master:
                    end_of_epoch(run, step, epoch, epoch_done, done)
                ranks.agree()
                ranks.agreeable = False
            if done:
                break
        bar.close()
        finish(run, step)
        out_dir, run = run.out_dir, None    # the model freed before the ranks leave together
        ok = True
        return out_dir
    except BaseException as e:
        if bar is not None:
            bar.close()                 # the error line below the progress bar, not after it
        failure = ranks.fail(e)
        if failure is e:
            raise
        raise failure from None
    finally:
        ranks.close(ok)


def finish(run: Run, step: int) -> None:
    """The replicas checked to be identical (torchrun), then the learning curves and where everything is."""
    if run.ranks.world > 1:
        try:
            check_replicas(run.model, run.master)
        except TrainError:
            run.ranks.everyone_fails()
            raise
    run.ranks.agreeable = True
    if run.master:
        report_done(run, step)
    run.ranks.agree()


def main(argv=None):
    """0 done; 2 one line on stderr (under torchrun: from the first rank that failed). A rank that failed
    where the others could not learn of it leaves at once (os._exit), so that it never waits for them."""
    code, abandon = 0, False
    try:
        train(argv)
    except (TrainError, data.DataError, config.ConfigError, pnba.CheckpointError, OSError) as e:
        if getattr(e, "pnba_speaks", True):
            line = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
            print(f"error: {line}", file=sys.stderr)
        code, abandon = 2, getattr(e, "pnba_abandon", False)
    except BaseException as e:
        if not getattr(e, "pnba_abandon", False):
            raise
        traceback.print_exc()
        code, abandon = 1, True
    if abandon:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
