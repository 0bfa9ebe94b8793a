"""Training a deep ensemble: members one after another, each with the full single-model budget."""

from __future__ import annotations

from pathlib import Path

from e2ip.models.ensemble import Ensemble
from e2ip.models.io import MODEL_FILE_NAME
from e2ip.models.single import PotentialModel
from e2ip.train.config.schema import Config
from e2ip.train.datasets import PreparedData, prepare_data
from e2ip.train.fit import train_model
from e2ip.train.ranks import is_global_zero


def train_ensemble(cfg: Config, out_dir, *, data: PreparedData | None = None,
                   resume: bool = False,
                   bases: list[PotentialModel] | None = None) -> Ensemble:
    """Train `cfg.ensemble.size` members one after another (seeds training.seed + k, which also
    sets their data order) into `out_dir/member_k/`; every member gets the whole `training` budget
    (max_epochs / max_time), as in the paper. `bases`: fine-tune member k from `bases[k]` (one
    base: every member from it). With `resume`, finished members are loaded and the
    interrupted one resumes. Calibration is left to the caller (`Potential.calibrate`).

    Under DDP each member's training is one distributed run of every process; only rank 0
    saves the members, and its ensemble alone holds the best weights (see `train_model`)."""
    out_dir = Path(out_dir)
    if not bases:
        bases = [None] * cfg.ensemble.size
    elif len(bases) == 1:
        bases = bases * cfg.ensemble.size
    data = data or prepare_data(cfg.data, bases[0])
    members = []
    for k in range(cfg.ensemble.size):
        member_dir = out_dir / f"member_{k}"
        done = member_dir / MODEL_FILE_NAME
        if resume and done.exists():
            members.append(PotentialModel.load(done))
            continue
        has_ckpt = (member_dir / "checkpoints" / "last.ckpt").exists()
        model = train_model(cfg, member_dir, data=data, resume=resume and has_ckpt, member=k,
                            base=bases[k])
        if is_global_zero():  # under DDP every rank trains the member; rank 0 saves it
            model.save(done)
        members.append(model)
    return Ensemble(members, metadata={"size": len(members), **members[0].metadata},
                    calibration_form=cfg.ensemble.calibration)
