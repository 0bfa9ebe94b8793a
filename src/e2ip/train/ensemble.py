"""Training a deep ensemble: members one after another, each with the full single-model budget."""

from __future__ import annotations

from pathlib import Path

from ..ensemble import Ensemble
from ..model import PotentialModel
from .config import Config
from .datasets import PreparedData, prepare_data
from .fit import train_model
from .ranks import is_global_zero


def train_ensemble(cfg: Config, out_dir, *, data: PreparedData | None = None,
                   resume: bool = False, base: PotentialModel | Ensemble | None = None) -> Ensemble:
    """Train `cfg.ensemble.size` members one after another (seeds training.seed + k, which also
    sets their data order) into `out_dir/member_k/`; every member gets the whole `training` budget
    (max_epochs / max_time), as in the paper. `base`: fine-tune every member from it (from the
    matching member of an ensemble). With `resume`, finished members are loaded and the
    interrupted one resumes. Calibration is left to the caller (`Potential.calibrate`).

    Under DDP each member's training is one distributed run of every process; only rank 0
    saves the members, and its ensemble alone holds the best weights (see `train_model`)."""
    out_dir = Path(out_dir)
    bases = list(base.members) if isinstance(base, Ensemble) else [base] * cfg.ensemble.size
    data = data or prepare_data(cfg.data, bases[0])
    members = []
    for k in range(cfg.ensemble.size):
        member_dir = out_dir / f"member_{k}"
        done = member_dir / "model.pt"
        if resume and done.exists():
            members.append(PotentialModel.load(done))
            continue
        has_ckpt = (member_dir / "checkpoints" / "last.ckpt").exists()
        model = train_model(cfg, member_dir, data=data, resume=resume and has_ckpt, member=k,
                            base=bases[k])
        if is_global_zero():  # under DDP every rank trains the member; rank 0 saves it
            model.save(done)
        members.append(model)
    return Ensemble(members, metadata={"size": len(members), **members[0].metadata})
