"""Train the uncertainty-under-shift runs side by side on a machine with many cores or a GPU.

    python experiments/parallel_train.py --dataset si_zeo22 --workers 16 \
        --set training.accelerator=gpu --set training.max_time=5.5

Every single model and every ensemble *member* is one job (`e2ip train` for single models, the
`member` action of this script for members, into <run>/member_k/); once all members of an
ensemble are trained, `e2ip train --resume` assembles it (it loads the finished members), fits
its calibration and evaluates it, exactly as a sequential `uncertainty_shift.py train` would. So
each member keeps the whole single-model budget. Jobs run `--workers` at a time, one CPU thread
each; finished runs are skipped and interrupted ones resume. `--deadline` (seconds) stops
starting new jobs after that long; whatever finished is kept.

On 2 cores use `uncertainty_shift.py train` instead (one job at a time).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from runner import ROOT, SEED_STRIDE, run_dir
from uncertainty_shift import DATASETS, TRAINED, write_water_bands

ENSEMBLE_SIZE_KEY = "ensemble.size="


@dataclass
class Job:
    name: str
    cmd: list[str]
    log: Path
    done: Path  # the file whose existence means the job is finished
    needs: list[Job] = field(default_factory=list)
    state: str = "waiting"  # waiting, running, done, failed, skipped
    seconds: float = 0.0


def ensemble_size(options: list[str]) -> int:
    sizes = [int(o[len(ENSEMBLE_SIZE_KEY):]) for o in options if o.startswith(ENSEMBLE_SIZE_KEY)]
    return sizes[-1] if sizes else 1


def jobs_for(dataset: str, method: str, seed: int, extra: list[str]) -> list[Job]:
    """The jobs of one run: one `e2ip train`, or the members and then the assembling."""
    config = ROOT / "experiments" / "configs" / f"shift_{dataset}.yaml"
    out = run_dir(dataset, method, seed)
    options = [f"training.seed={SEED_STRIDE * seed}", "training.num_threads=1",
               *TRAINED[method], *extra]
    sets = [a for o in options for a in ("--set", o)]
    final = Job(f"{dataset}/{method}/seed{seed}", ["e2ip", "train", str(config), "--out", str(out),
                                                   *sets], out.parent / f"{out.name}.log",
                out / "model.pt")
    size = ensemble_size(options)
    if size == 1:
        return [final]
    members = [Job(f"{final.name}/member_{k}",
                   [sys.executable, str(Path(__file__).resolve()), "member", str(config), str(out),
                    str(k), *sets], out / f"member_{k}.log", out / f"member_{k}" / "model.pt")
               for k in range(size)]
    final.cmd.append("--resume")
    final.needs = members
    return [*members, final]


def train_member(config: str, out: str, member: int, overrides: list[str]) -> None:
    """Train member `member` of the ensemble run `out` (as `e2ip train` would, one after another):
    writes out/config.yaml and out/member_k/model.pt; resumes an interrupted member."""
    from e2ip.models.io import MODEL_FILE_NAME
    from e2ip.train.config.yaml_io import dump_config, load_config
    from e2ip.train.fit import train_model

    cfg = load_config(config, overrides)
    out_dir = Path(out)
    member_dir = out_dir / f"member_{member}"
    if (member_dir / MODEL_FILE_NAME).exists():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out_dir / "config.yaml")  # what `e2ip train --resume` checks its config against
    resume = (member_dir / "checkpoints" / "last.ckpt").exists()
    start = time.time()
    model = train_model(cfg, member_dir, resume=resume, member=member)
    model.save(member_dir / MODEL_FILE_NAME)
    (member_dir / "train_seconds.json").write_text(json.dumps(
        {"seconds": time.time() - start, "threads": cfg.training.num_threads, "resumed": resume}))


def run_jobs(jobs: list[Job], workers: int, deadline: float | None) -> None:
    """Run the jobs, `workers` at a time, each when the jobs it needs are done."""
    start = time.time()
    lock = threading.Lock()
    for job in jobs:
        if job.done.exists():
            job.state = "skipped"

    def next_job() -> Job | None:
        with lock:
            if deadline is not None and time.time() - start > deadline:
                return None
            for job in jobs:
                if job.state == "waiting" and all(n.state in ("done", "skipped") for n in job.needs):
                    job.state = "running"
                    return job
            return None

    def pending() -> bool:
        with lock:
            blocked = any(n.state == "failed" for j in jobs if j.state == "waiting" for n in j.needs)
            return any(j.state in ("waiting", "running") for j in jobs) and not (
                blocked and not any(j.state == "running" for j in jobs))

    def worker() -> None:
        while pending():
            if deadline is not None and time.time() - start > deadline:
                return
            job = next_job()
            if job is None:
                time.sleep(1.0)
                continue
            t0 = time.time()
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with open(job.log, "a") as log:
                rc = subprocess.call(job.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            job.seconds = time.time() - t0
            job.state = "done" if rc == 0 and job.done.exists() else "failed"
            print(f"[{time.time() - start:6.0f} s] {job.name}: {job.state} in {job.seconds:.0f} s"
                  + ("" if job.state == "done" else f" (log: {job.log})"), flush=True)
            if job.state == "done" and not job.needs:
                record = job.done.parent / "train_seconds.json"
                if not record.exists():
                    record.write_text(json.dumps({"seconds": job.seconds, "threads": 1,
                                                  "resumed": False}))

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for job in jobs:
        if job.needs and job.state == "done":  # an ensemble: its cost is its members' sum
            seconds = [json.loads((n.done.parent / "train_seconds.json").read_text())["seconds"]
                       for n in job.needs if (n.done.parent / "train_seconds.json").exists()]
            (job.done.parent / "train_seconds.json").write_text(json.dumps(
                {"seconds": sum(seconds), "threads": 1, "resumed": False,
                 "member_seconds": seconds, "parallel": True}))
    counts = {s: sum(j.state == s for j in jobs) for s in ("done", "skipped", "failed", "waiting")}
    print(f"finished in {time.time() - start:.0f} s: {counts}", flush=True)


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "member":
        p = argparse.ArgumentParser(prog="parallel_train.py member")
        p.add_argument("config")
        p.add_argument("out")
        p.add_argument("member", type=int)
        p.add_argument("--set", dest="overrides", action="append", default=[])
        a = p.parse_args(argv[1:])
        train_member(a.config, a.out, a.member, a.overrides)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=DATASETS, nargs="+", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(TRAINED), choices=list(TRAINED))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds after which no new job starts")
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        help="an option for every job, e.g. training.accelerator=gpu")
    args = parser.parse_args(argv)
    jobs = []
    for dataset in args.dataset:
        if dataset == "water":
            write_water_bands()
        for seed in args.seeds:
            for method in args.methods:
                jobs += jobs_for(dataset, method, seed, args.extra)
    # members first (longest), assembling as soon as an ensemble's members are done
    run_jobs(jobs, args.workers, args.deadline)


if __name__ == "__main__":
    main()
