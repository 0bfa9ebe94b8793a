"""How calibrated is the raw head for the weight average vs the last trained weights?

Reads a run's last checkpoint (which holds both: `state_dict` = the average, `current_model_state`
= the trained weights), fits the variance scale of each on the run's validation set and reports
raw test metrics (first N test frames):

    python benchmarks/ema_vs_trained.py benchmarks/runs/aspirin_e2ip_64_ema --n-test 300
"""

from __future__ import annotations

import argparse

import torch

from e2ip import PotentialModel, load_model
from e2ip.evaluation.evaluate import evaluate
from e2ip.models.state import portable_state_dict
from e2ip.train.config.yaml_io import load_config
from e2ip.train.datasets import prepare_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(f"{args.run}/config.yaml")
    data = prepare_data(cfg.data)
    spec = load_model(f"{args.run}/model.pt").spec()
    ckpt = torch.load(f"{args.run}/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    for name, key in (("weight average (exported)", "state_dict"),
                      ("trained weights (last step)", "current_model_state")):
        model = PotentialModel(**spec)
        state = {k[len("model."):]: v for k, v in portable_state_dict(ckpt[key]).items()}
        model.load_state_dict(state)
        model.eval()
        scale = model.calibrate(data.validation)
        m, _ = evaluate(model, data.test[: args.n_test], units=cfg.data.report_units, form="raw")
        print(f"{name}: variance scale fitted on validation {scale:.3f}; raw test force MAE "
              f"{m['force_mae']:.3f} {m['units']['forces']}, CE {m['calibration_error']:.3f}, "
              f"Cov@95 {m['coverage_95']:.3f}")


if __name__ == "__main__":
    main()
