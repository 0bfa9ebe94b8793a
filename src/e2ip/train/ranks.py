"""Which process of a distributed (DDP) run this is, before and after the Trainer exists.

Under DDP every process runs the whole `e2ip train` job: Lightning's launcher re-runs the
command for local ranks 1.., `torchrun` and `srun` start every copy themselves. Only global rank 0
writes the run's files; the others train and return."""

from __future__ import annotations

import os

import torch.distributed as dist


def is_global_zero() -> bool:
    """True in the process of global rank 0 (and in a run that is not distributed).

    Once the process group exists (during and after `Trainer.fit`) its rank decides. Before it,
    the environment: `RANK` (torchrun), then `LOCAL_RANK` with `NODE_RANK`/`GROUP_RANK` (set by
    Lightning's launcher in the processes it starts), then `SLURM_PROCID` (srun; read after
    `LOCAL_RANK` because an interactive SLURM shell sets it to 0 in every process started from
    it), then `NODE_RANK` alone (Lightning started by hand on each node)."""
    # Why not Lightning's `rank_zero_only.rank` (its `_get_rank`): before the process group
    # exists it reads LOCAL_RANK alone, so local rank 0 of every node would count as global
    # rank 0 and write the run's files.
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]) == 0
    node = int(env.get("NODE_RANK", env.get("GROUP_RANK", 0)))
    if "LOCAL_RANK" in env:
        return node == 0 and int(env["LOCAL_RANK"]) == 0
    if "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]) == 0
    return node == 0
