"""torchrun ranks that start, agree and stop together: the process group, failure agreement, replica checks.

    from distributed import Ranks, setup_distributed    # used by train.py

A rank that fails must bring the whole job down within a bounded time with one line, never a hang: see
Ranks. A restarted job's ranks meet under keys of their own start (setup_distributed).
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from rundir import TrainError


class PeerFailed(TrainError):
    """Another rank failed: its line is the one printed; this rank stops with it."""


class LostRanks(TrainError):
    """A collective failed: another rank died, or a collective ran past run.collective_timeout_s."""


def _collective_error(e: BaseException) -> bool:
    text = str(e)
    marks = ("gloo", "NCCL", "Connection closed", "Connection reset", "timed out", "Timed out")
    return isinstance(e, dist.DistError) or isinstance(e, RuntimeError) and any(m in text for m in marks)


class Ranks:
    """How the ranks of a torchrun job stop together, never waiting for a rank that will not come.

    A rank's failure must reach the others, or they wait in their next collective. Where no collective of
    the training itself runs (the set-up; what rank 0 alone does: run directory, validation, checkpoints,
    the report), every rank meets the others at agree(): one all_gather of each rank's error line (None:
    fine), so that a failure anywhere stops every rank at the same point; they leave together (barrier,
    destroy_process_group) and the first failing rank alone prints its line. Within the training's own
    collectives (DDP's all-reduce), a failure cannot be agreed on: the failing rank leaves at once, without
    the barrier, which closes its connections; the others' collectives then fail (Gloo: connection closed)
    or time out after run.collective_timeout_s, each with one line (LostRanks). A single process: agree()
    is a no-op."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.agreeable = True     # between agree() points: a failure here is settled at the next one
        self.agreed = False       # the current failure is known to every rank
        self.speaks = True        # this rank prints the failure (the first failing one)

    def agree(self, error: BaseException | None = None) -> None:
        if self.world == 1 or not dist.is_initialized():
            if error is not None:
                raise error
            return
        lines = [None] * self.world
        dist.all_gather_object(lines, None if error is None else str(error).splitlines()[0] if str(error)
                               else type(error).__name__)
        failed = [r for r, line in enumerate(lines) if line is not None]
        if not failed:
            return
        self.agreed, self.speaks = True, failed[0] == self.rank
        if error is not None:
            raise error
        raise PeerFailed(f"rank {failed[0]} failed: {lines[failed[0]]}")

    def everyone_fails(self) -> None:
        """Every rank raises the same error at the same point (an all-reduced flag): rank 0 speaks."""
        self.agreed, self.speaks = True, self.rank == 0

    def fail(self, e: BaseException) -> BaseException:
        """This rank failed with e: settle it with the others if they will come to agree(), and return what
        to raise (a lost collective as one line), marked for main()."""
        if self.world > 1 and dist.is_initialized() and self.agreeable and not self.agreed \
                and not _collective_error(e):
            with contextlib.suppress(BaseException):
                self.agree(e)
        if self.world > 1 and not self.agreed and not isinstance(e, TrainError) and _collective_error(e):
            line = str(e).splitlines()[0] if str(e) else type(e).__name__
            e = LostRanks(f"rank {self.rank} lost the other ranks: a rank failed (its error is above), was "
                          f"killed, or a collective waited longer than run.collective_timeout_s ({line})")
        with contextlib.suppress(AttributeError):
            e.pnba_speaks = self.speaks
            e.pnba_abandon = self.world > 1 and not self.agreed
        return e

    def close(self, ok: bool) -> None:
        if not dist.is_initialized():
            return
        if ok or self.agreed:
            dist.barrier()
            dist.destroy_process_group()


def setup_distributed(timeout_s: float = 1800.0):
    """(rank, world, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python runs one process. Every
    collective waits at most timeout_s (run.collective_timeout_s) for the other ranks.

    Under torchrun the ranks meet through the agent's key-value store, which outlives a restart of the
    workers: each start keys its rendezvous by TORCHELASTIC_RESTART_COUNT. Without that a restarted rank
    read the address that a dead rank of the previous start had published under the same key, and its
    connection was refused (Gloo connectFullMesh: exit 1), or it waited on a peer that would never answer."""
    if "RANK" not in os.environ:
        return 0, 1, None
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    backend, timeout = "nccl" if use_cuda else "gloo", timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=False, timeout=timeout)
        start = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"pnba/start{start}/", store), rank=rank,
                                world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank) if use_cuda else None


def rank_rng_states(world):
    """Every rank's RNG states (collective; None for one process): the checkpoint keeps them all, so that a
    resumed rank continues its own random stream and a resumed job is exact."""
    if world == 1:
        return None
    mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available()
            else None}
    states = [None] * world
    dist.all_gather_object(states, mine)
    return states


def check_replicas(model, master):
    """DDP keeps every rank's weights identical; verify it once at the end rather than trust it."""
    digest = torch.stack([p.detach().double().sum() for p in model.parameters()])  # NCCL: on device
    gathered = [torch.zeros_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, digest)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise TrainError("DDP replicas diverged: the ranks hold different weights")
    if master:
        print(f"replicas identical on {len(gathered)} ranks")
