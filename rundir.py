"""Run directories: where a run writes, the config of a run that is continued, and its metrics file.

    from rundir import plan_run_dir, set_up_run_dir, load_resume_checkpoint   # used by train.py

A run directory holds config.json (the config, plus the run's id, torchrun's job id and what damaged
recordings lost), metrics.jsonl, last.pt and epoch_<E>.pt. It is never overwritten: --out on a folder that
holds a run is refused unless the run is continued (--resume DIR, --resume auto, a torchrun restart) or
started over (--restart, which moves the old run aside). A damaged checkpoint is named with the newest
loadable one of its folder.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import time

import torch.distributed as dist

import config
import pnba
import stats


class TrainError(Exception):
    """A run that cannot go on: one line saying why."""


def resume_checkpoint(resume):
    """--resume takes a run directory (its last.pt) or a checkpoint file."""
    return os.path.join(resume, "last.pt") if os.path.isdir(resume) else resume


def resolve_resume(args) -> None:
    """--resume auto, and a job that torchrun restarted (TORCHELASTIC_RESTART_COUNT > 0): continue the run in
    --out if it holds a checkpoint, start it otherwise (over a run that never reached one). A restarted job
    continues only its own run (config.json records torchrun's run id), so that a first start refused by an
    old run does not become its continuation; --resume auto continues the run --out holds if it is of this
    command's config (build_config checks). Decided on every rank before the ranks meet, so before anything
    of this start is written: every rank sees the same folder. Sets args.resume, args.auto, args.partial."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    args.auto, args.partial = args.resume == "auto", False
    if args.auto and args.restart:
        raise TrainError("--resume auto continues the run in --out and --restart starts it over: choose one")
    if args.auto and not args.out:
        raise TrainError("--resume auto continues the run in --out: give --out DIR")
    if restarts and args.resume is None and not args.out:
        raise TrainError(f"torchrun restarted the job (restart {restarts}), but a run without --out cannot "
                         "be found again: start jobs that may restart with --out DIR --resume auto")
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    own = bool(restarts and args.resume is None and job and _recorded(args.out).get("torchrun_id") == job)
    if not (args.auto or own):
        return
    args.auto, args.restart = True, False       # the command line describes the run: checked like auto
    if os.path.exists(os.path.join(args.out, "last.pt")):
        args.resume = args.out
    else:
        args.resume, args.partial = None, True


def _recorded(out) -> dict:
    """The run directory's config.json ({} if it has none or it cannot be read)."""
    try:
        with open(os.path.join(out, "config.json")) as f:
            rec = json.load(f)
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


TRAINING_KEYS = ("optimizer", "scheduler", "rng_cpu", "rng_cuda", "step")


def load_resume_checkpoint(path) -> dict:
    """The checkpoint --resume names, whole, a training checkpoint and of the run in its folder (config.json's
    run_id); otherwise a CheckpointError naming it and the newest checkpoint of the folder that is."""
    try:
        return _training_checkpoint(path)
    except pnba.CheckpointError as e:
        raise pnba.CheckpointError(f"{e}; {_newest_loadable(path)}") from None


def _training_checkpoint(path) -> dict:
    ckpt = pnba.load_checkpoint(path)
    missing = [k for k in TRAINING_KEYS if k not in ckpt]
    if missing:
        raise pnba.CheckpointError(f"{path}: not a training checkpoint (no {', '.join(missing)}); it cannot "
                                   "be resumed")
    folder = os.path.dirname(os.path.abspath(path))
    recorded = _recorded(folder).get("run_id")
    if recorded and ckpt.get("run_id") and ckpt["run_id"] != recorded:
        diff = config_differences(ckpt["config"], _recorded(folder))
        raise pnba.CheckpointError(f"{path}: a checkpoint of another run (run id {ckpt['run_id']}, "
                                   f"{os.path.join(folder, 'config.json')} says {recorded}"
                                   f"{'; config ' + diff if diff else ''})")
    return ckpt


def _newest_loadable(path) -> str:
    """Where to continue from instead of a damaged checkpoint: the newest whole one of its run directory."""
    folder = os.path.dirname(os.path.abspath(path))
    found, kept = [], glob.glob(os.path.join(glob.escape(folder), "epoch_*.pt"))
    for other in [os.path.join(folder, "last.pt"), *kept]:
        if os.path.isfile(other) and os.path.abspath(other) != os.path.abspath(path):
            with contextlib.suppress(pnba.CheckpointError, config.ConfigError):
                found.append((int(_training_checkpoint(other)["step"]), other.endswith("last.pt"), other))
    if not found:
        return f"no loadable checkpoint in {folder}: start over with --out {folder} --restart"
    step, _, best = max(found)
    return f"the newest loadable checkpoint in {folder} is {best} (step {step}): continue with " \
        f"--resume {best}"


def config_differences(a: dict, b: dict, skip=()) -> str:
    """The config keys (section.field) whose values differ, as 'key A vs B', first three."""
    out = []
    for section, values in a.items():
        if not isinstance(values, dict):
            continue
        for name, value in values.items():
            key, other = f"{section}.{name}", (b.get(section) or {}).get(name)
            if key not in skip and other is not None and value != other:
                out.append(f"{key} {config._cell(value)} vs {config._cell(other)}")
    return ", ".join(out[:3]) + (", ..." if len(out) > 3 else "")


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
        except OSError as e:        # the others wait in the broadcast: an error must reach them through it
            verdict[1] = f"{e.filename or args.out}: {e.strerror or e}"
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
    if getattr(args, "partial", False):   # --resume auto over a run that never reached a checkpoint
        held = [f for f in held if f not in ("config.json", "metrics.jsonl") and not config._TEMP.search(f)]
    if held and not args.restart:
        files = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise TrainError(f"{out}: already holds a run ({files}); continue it with --resume {out}, or start "
                         f"over with --restart (the old run is moved to {out.rstrip(os.sep)}.old-<time>, "
                         "never deleted)")
    return out


def set_up_run_dir(out_dir, args, cfg, step, records=None) -> None:
    """Make the run directory ready (rank 0, once the config, data and model are known to be good).
    --restart: the old run is moved to <out>.old-<time> first. Resuming: temp files a killed save left
    are removed, and metrics.jsonl is cut back to the checkpoint's step (the lines after it would be
    replayed); --resume auto over a run that never reached a checkpoint: its metrics.jsonl is removed.
    Then config.json: the config, plus records (run_id, torchrun_id, skipped) beside its sections."""
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
    if getattr(args, "partial", False) and os.path.exists(metrics):
        os.remove(metrics)
    if args.resume and os.path.exists(metrics):
        kept = []
        with open(metrics) as f:
            for line in f:
                with contextlib.suppress(ValueError):      # a line cut short by the kill is dropped too
                    if json.loads(line)["step"] <= step:
                        kept.append(line)
        config.write_atomic(metrics, "".join(kept))
    config.write_atomic(os.path.join(out_dir, "config.json"),
                        json.dumps({**config.to_dict(cfg), **(records or {})}, indent=2))


def run_records(run_id, mice) -> dict:
    """What config.json records beside the config: the run's id (every checkpoint carries it), torchrun's job
    id (a restarted job finds its own run by it), and what damaged recordings lost (e.g. NWB units without
    spikes, trials with NaN velocity), per animal."""
    out = {"run_id": run_id}
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        out["torchrun_id"] = os.environ["TORCHELASTIC_RUN_ID"]
    skipped = {m.name: {"file": m.path, **m.skipped} for m in mice if getattr(m, "skipped", None)}
    if skipped:
        out["skipped"] = skipped
    return out


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_jsonl(path, rec):
    try:
        with open(path, "a") as f:
            f.write(json.dumps(stats.jsonable(rec)) + "\n")
    except OSError as e:
        raise TrainError(f"{path}: cannot append ({e.strerror or e}); the checkpoints written so far are "
                         f"intact: make room, then continue with --resume {os.path.dirname(path)}") from None


def _command_config(args, rest, base: config.Config | None = None) -> config.Config:
    """base (default: the --preset's config) with the command line's overrides, --data and --holdout."""
    cfg = base if base is not None else config.preset(args.preset or "demo")
    cfg, unknown = config.parse_overrides(cfg, rest)
    if unknown:
        raise TrainError(f"unknown arguments {' '.join(unknown)}; config keys look like --optim.lr 3e-4")
    if args.data:
        cfg.data.paths = tuple(args.data)
    if args.holdout is not None:
        cfg.data.holdout = tuple(h for h in args.holdout.split(",") if h)
    return config.validate(cfg)


def build_config(args, rest):
    """Config from (resumed checkpoint | preset) + command-line overrides, validated as a whole. --resume auto
    (and a restarted job): the command line's config, which must be the checkpoint's (model, data, optim and
    the seed: what the weights depend on; the rest of run.* may change, as with --resume)."""
    ckpt = None
    if args.resume:
        path = resume_checkpoint(args.resume)
        ckpt = load_resume_checkpoint(path)
        if getattr(args, "auto", False):
            cfg = _command_config(args, rest)
            mine = config.to_dict(cfg)
            theirs = config.to_dict(config.from_dict(ckpt["config"]))
            skip = {"data.paths"} if not cfg.data.paths else set()
            skip |= {"data.holdout"} if not cfg.data.holdout else set()     # filled in from the data
            keep = {"model": mine["model"], "data": mine["data"], "optim": mine["optim"],
                    "run": {"seed": mine["run"]["seed"]}}
            diff = config_differences(keep, theirs, skip)
            if diff:
                raise pnba.CheckpointError(
                    f"{path}: a run of another config ({diff}; this command vs the checkpoint): --resume "
                    f"auto continues only the run of its own command; continue that one with --resume "
                    f"{args.resume}, or start over with --out {args.resume} --restart")
            return cfg, ckpt
        if args.preset:
            raise TrainError(f"{path}: --preset cannot change a resumed run; override single fields instead")
        return _command_config(args, rest, config.from_dict(ckpt["config"])), ckpt
    return _command_config(args, rest), ckpt
