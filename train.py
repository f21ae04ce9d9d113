"""Train PNBA: demo on a laptop, the paper's configuration on one or many GPUs.

    python train.py                                 # demo: writes synthetic data, minutes on 2 CPU cores
    python train.py --data /data/sensorium --preset paper --holdout dynamic29228,dynamic29755
    torchrun --standalone --nproc_per_node=8 train.py --data /data/sensorium --preset paper
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        train.py --data /data/sensorium --preset paper      # multi-node; node_rank=1 on the other node
    python train.py --resume runs/RUN                       # continue a run exactly where it stopped

Any config field can be overridden, e.g. `--optim.lr 3e-4 --model.neural_projector set`
(see config.py or README "Config reference"). A run directory holds config.json, metrics.jsonl,
last.pt and epoch_<E>.pt checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import config
import data
import pnba

DEMO_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_synth")


class TrainError(Exception):
    """A run that cannot go on: one line saying why."""


# ------------------------------------------------------------------------------------------------
# set-up
# ------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, help="paper | demo | tiny (default: demo)")
    p.add_argument("--data", nargs="+", default=None, help="mouse folders or their parent folder")
    p.add_argument("--holdout", default=None, help="comma-separated mouse names (or unique prefixes)")
    p.add_argument("--out", default=None, help="run directory (default: a new folder under runs/)")
    p.add_argument("--resume", default=None, help="run directory (or checkpoint) to continue")
    return p.parse_known_args(argv)


def resume_checkpoint(resume):
    """--resume takes a run directory (its last.pt) or a checkpoint file."""
    return os.path.join(resume, "last.pt") if os.path.isdir(resume) else resume


def build_config(args, rest):
    """Config from (resumed checkpoint | preset) + command-line overrides."""
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
    return cfg, ckpt


def resolve_data(cfg, rank):
    """Mouse folders for the run; writes the synthetic demo dataset if no data was named."""
    if not cfg.data.paths:
        root = os.path.join(DEMO_DATA, cfg.data.synth_preset)
        if rank == 0 and not os.path.isdir(root):
            print(f"writing the synthetic {cfg.data.synth_preset} dataset to {root} ...")
            data.write_synthetic(root, preset=cfg.data.synth_preset, seed=cfg.run.seed)
        if dist.is_initialized():
            dist.barrier()
        cfg.data.paths = (root,)
        if not cfg.data.holdout:
            truth = data.read_synthetic_truth(root)
            cfg.data.holdout = tuple(truth["heldout"]) + tuple(truth["control"])
    mice = [data.Mouse(p, std_floor=cfg.data.std_floor) for p in data.find_mice(list(cfg.data.paths))]
    names = [m.name for m in mice]
    heldout = set()
    for h in cfg.data.holdout:
        hits = [n for n in names if n == h] or [n for n in names if n.startswith(h)]
        if len(hits) != 1:
            raise TrainError(f"--holdout {h!r} matches {len(hits)} of the mice {', '.join(names)}")
        heldout.add(hits[0])
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


def pick_device(cfg, ddp_device):
    if ddp_device is not None:
        return ddp_device
    if cfg.run.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.run.device)


def align_scale(cfg, step):
    """Weight of the alignment terms (KL, matching) at `step`: a linear ramp from 0 to 1.

    Without it the demo collapses: the alignment terms penalise x/y mismatch by (mu_x - mu_y)^2 / var,
    so the cheapest answer is the same constant latent for every trial, reached before the
    reconstruction terms have made the latents informative (README, "Collapse").
    """
    if cfg.optim.align_warmup_iters <= 0:
        return 1.0
    return min(1.0, step / cfg.optim.align_warmup_iters)


def make_scheduler(optimizer, cfg, total_steps):
    """Linear warm-up from lr*warmup_ratio, then cosine decay to min_lr."""
    warmup = max(1, min(cfg.optim.warmup_iters, total_steps // 2))
    sched = torch.optim.lr_scheduler
    return sched.SequentialLR(optimizer, [
        sched.LinearLR(optimizer, start_factor=cfg.optim.warmup_ratio, total_iters=warmup),
        sched.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup), eta_min=cfg.optim.min_lr),
    ], milestones=[warmup])


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------

def batch_to(batch, device):
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


@torch.no_grad()
def validate(model, train_mice, heldout_mice, cfg, device):
    """Sensorium single-trial correlation (stimulus -> neural) and video PSNR (neural -> video).

    Correlation: per-neuron Pearson r over the concatenated frames of the non-train tiers of the
    training animals (the held-out animals have no readout: the decoder is per animal).
    PSNR: video decoded from the neural latent, for every animal, held-out ones zero-shot.
    """
    model.eval()
    metrics = {}
    for mouse in train_mice + heldout_mice:
        trained = mouse in train_mice
        tiers = ["oracle"] if "oracle" in set(mouse.tiers) else ["train"]
        trials = mouse.trials(tiers)[:32]
        preds, targets, mse = [], [], []
        for i in trials:
            w = batch_to(data.eval_windows(mouse, int(i), cfg.data.frames), device)
            video, resp = w["video"], w["responses"]
            if trained:
                out = model(resp, video, mouse.name, coords=_coords(mouse, device))
                preds.append(out.rate_cross.flatten(0, 1).float().cpu())
                targets.append(resp.flatten(0, 1).float().cpu())
                video_cross = out.video_cross
            else:
                video_cross = model.decode_video(model.encode(resp, None, coords=_coords(mouse, device)).mu_x,
                                                 video.shape[-2:])
            mse.append(float(((video_cross.float() - video.float()) ** 2).mean()))
        m = {"psnr": float(10 * np.log10(1.0 / max(np.mean(mse), 1e-12))) if mse else float("nan")}
        if preds:
            m["corr"] = float(np.nanmean(pnba.per_neuron_corr(torch.cat(preds), torch.cat(targets)).numpy()))
        metrics[mouse.name] = m
    model.train()
    summary = {
        "corr_train_animals": float(np.nanmean([metrics[m.name]["corr"] for m in train_mice])),
        "psnr_train_animals": float(np.nanmean([metrics[m.name]["psnr"] for m in train_mice])),
    }
    if heldout_mice:
        summary["psnr_heldout_animals"] = float(np.nanmean([metrics[m.name]["psnr"] for m in heldout_mice]))
    return {**summary, "per_animal": metrics}


def _coords(mouse, device):
    return None if mouse.coords is None else torch.as_tensor(mouse.coords, dtype=torch.float32, device=device)


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------

def save_checkpoint(path, raw_model, optimizer, scheduler, cfg, state, all_mice, heldout):
    pnba.save_checkpoint(path, {
        "model": raw_model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "config": config.to_dict(cfg),
        "neuron_counts": dict(raw_model.neuron_counts),
        "mice": {m.name: m.n_neurons for m in all_mice},
        "heldout": sorted(heldout),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        **state,
    })


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------

def train(argv=None):
    """Run training; returns the run directory. argv defaults to sys.argv[1:]."""
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    rank, world, ddp_device = setup_distributed()
    master = rank == 0
    try:
        cfg, ckpt = build_config(args, rest)
        device = pick_device(cfg, ddp_device)
        train_mice, heldout_mice = resolve_data(cfg, rank)
        all_mice = train_mice + heldout_mice
        if ckpt is not None:
            pnba.check_mice(ckpt, {m.name: m.n_neurons for m in all_mice}, source=args.resume)

        torch.manual_seed(cfg.run.seed)
        model = pnba.PNBA(cfg.model, {m.name: m.n_neurons for m in train_mice}).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                      weight_decay=cfg.optim.weight_decay)
        per_epoch = data.train_batches_per_epoch(train_mice, cfg.data.batch_size, rank, world)
        if per_epoch == 0:
            raise TrainError(f"no training windows: batch size {cfg.data.batch_size} is larger than "
                             f"every mouse's train tier")
        total_steps = per_epoch * cfg.optim.epochs
        scheduler = make_scheduler(optimizer, cfg, total_steps)
        step = 0
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            torch.set_rng_state(ckpt["rng_cpu"])
            if torch.cuda.is_available() and ckpt["rng_cuda"]:
                torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
            step = int(ckpt["step"])
        raw_model = model
        if world > 1:
            # one mouse per batch: the other mice's decoder heads get no gradient in that step
            model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                        find_unused_parameters=True)

        out_dir = args.out
        if args.resume:
            out_dir = os.path.dirname(os.path.abspath(resume_checkpoint(args.resume)))
        if out_dir is None:
            name = [time.strftime("%Y%m%d-%H%M%S") + f"-{args.preset or 'demo'}"]
            if world > 1:
                dist.broadcast_object_list(name, src=0)
            out_dir = os.path.join("runs", name[0])
        if master:
            os.makedirs(out_dir, exist_ok=True)
            _write_json(os.path.join(out_dir, "config.json"), config.to_dict(cfg))
            print(f"run {out_dir}: {len(train_mice)} training animals, {len(heldout_mice)} held out "
                  f"({', '.join(m.name for m in heldout_mice) or 'none'}); {per_epoch} steps/epoch x "
                  f"{world} rank(s); device {device}")
        metrics_path = os.path.join(out_dir, "metrics.jsonl")
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if (device.type == "cuda" and cfg.run.amp) \
            else contextlib.nullcontext()

        stop_at = cfg.run.max_steps or total_steps
        nonfinite = 0
        last_val = None
        start_epoch, start_batch = divmod(step, per_epoch)
        bar = tqdm(total=stop_at, initial=step, disable=not master, dynamic_ncols=True)
        model.train()
        t_log, windows_log = time.time(), 0
        for epoch in range(start_epoch, cfg.optim.epochs):
            if step >= stop_at:
                break
            loader = data.make_train_loader(train_mice, cfg.data.frames, cfg.data.batch_size,
                                            cfg.data.num_workers, cfg.run.seed, epoch, rank, world,
                                            start_batch=start_batch if epoch == start_epoch else 0)
            for batch in loader:
                batch = batch_to(batch, device)
                mouse = next(m for m in train_mice if m.name == batch["mouse"])
                with amp:
                    out = model(batch["responses"], batch["video"], batch["mouse"],
                                coords=_coords(mouse, device), align_scale=align_scale(cfg, step))
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
                    _append_jsonl(metrics_path, rec)
                    bar.set_postfix(loss=f"{rec['total']:.4g}", win_s=f"{rec['windows_per_s']:.0f}")
                    t_log, windows_log = time.time(), 0
                if step >= stop_at:
                    break
            epoch_done = step % per_epoch == 0 and step > 0
            done = step >= stop_at
            if master and (epoch_done or done):
                e = epoch + 1 if epoch_done else epoch
                if cfg.run.val_every and ((epoch_done and e % cfg.run.val_every == 0) or done):
                    last_val = validate(raw_model, train_mice, heldout_mice, cfg, device)
                    _append_jsonl(metrics_path, {"step": step, "epoch": e, "val": last_val})
                    tqdm.write(f"epoch {e} step {step}: val corr {last_val['corr_train_animals']:.3f}, "
                               f"psnr {last_val['psnr_train_animals']:.2f} dB"
                               + (f", held-out psnr {last_val['psnr_heldout_animals']:.2f} dB"
                                  if heldout_mice else ""))
                state = {"step": step, "epoch": e}
                save_checkpoint(os.path.join(out_dir, "last.pt"), raw_model, optimizer, scheduler, cfg,
                                state, all_mice, {m.name for m in heldout_mice})
                if epoch_done and cfg.run.ckpt_every and e % cfg.run.ckpt_every == 0:
                    save_checkpoint(os.path.join(out_dir, f"epoch_{e}.pt"), raw_model, optimizer, scheduler,
                                    cfg, state, all_mice, {m.name for m in heldout_mice})
            if done:
                break
        bar.close()
        if world > 1:
            check_replicas(raw_model, master)
        if master:
            print(f"\ndone: {step} steps. run directory {out_dir}\n"
                  f"  config       {os.path.join(out_dir, 'config.json')}\n"
                  f"  metrics      {metrics_path}\n"
                  f"  checkpoint   {os.path.join(out_dir, 'last.pt')}\n"
                  "next:\n"
                  f"  python extract.py --ckpt {os.path.join(out_dir, 'last.pt')}\n"
                  f"  python stats_crossmodal.py {os.path.join(out_dir, 'reps.h5')}\n"
                  f"  python stats_zeroshot.py {os.path.join(out_dir, 'reps.h5')}")
        del model, raw_model, optimizer
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


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _append_jsonl(path, rec):
    with open(path, "a") as f:
        f.write(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v)
                            for k, v in rec.items()}) + "\n")


def main(argv=None):
    try:
        train(argv)
    except (TrainError, data.DataError, config.ConfigError, pnba.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
