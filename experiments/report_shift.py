"""The report of experiments/uncertainty_shift.py: every method on every test set, mean ± std over
the seeds, written to docs/results/uncertainty_shift_<dataset>.{json,md}."""

from __future__ import annotations

import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from runner import DATA, RESULTS, ROOT, WATER_DATA, mean_std, prepared, run_dir, train_seconds
from scipy import stats

from e2ip.data.read import read_structures
from e2ip.evaluation.evaluate import collect, evaluate, time_per_atom_ms
from e2ip.models.io import load_model
from e2ip.models.single import PotentialModel
from e2ip.stats.calibration import fit_variance_scale

#: (row label, trained method, form, post-hoc variant, per-structure aggregate)
ROWS = [
    ("e2IP (paper, cal)", "e2ip", "cal", None, "mean"),
    ("e2IP (paper, raw)", "e2ip", "raw", None, "mean"),
    ("e2IP-FD (ours, cal)", "e2ip", "cal", "feature_distance", "mean"),
    ("e2IP-FD (ours, raw)", "e2ip", "raw", "feature_distance", "mean"),
    ("e2IP-FD, one scale (ablation)", "e2ip", "cal", "feature_distance_one_scale", "mean"),
    ("e2IP-FD (ours, cal), max aggregate", "e2ip", "cal", "feature_distance", "max"),
    ("eIP (cal)", "eip", "cal", None, "mean"),
    ("Ensemble x5 (cal)", "ensemble", "cal", None, "mean"),
    ("Ensemble x5 (raw)", "ensemble", "raw", None, "mean"),
    ("Ensemble x5 (cal), max aggregate", "ensemble", "cal", None, "max"),
]
KEYS = ["force_mae", "coverage_95", "calibration_error", "nll", "spearman",
        "spearman_per_structure", "auc_worst10", "ause_per_structure", "auc_reference"]
HEADERS = {"force_mae": "MAE (eV/Å)", "coverage_95": "Cov@95", "calibration_error": "CE",
           "nll": "NLL", "spearman": "ρ atom", "spearman_per_structure": "ρ struct",
           "auc_worst10": "AUC worst10", "ause_per_structure": "AUSE struct",
           "auc_reference": "AUC shift"}


def test_sets(dataset: str, data) -> tuple[dict[str, list], str]:
    """{name: structures} and the name of the in-distribution set (the shift reference)."""
    if dataset == "ethanol":
        d = DATA / "ethanol_botnet"
        return {
            "in distribution (test_MD)": read_structures(d / "test_MD.xyz"),
            "methanol (test_eth_meth :145)": read_structures(d / "test_eth_meth.xyz",
                                                             index=":145"),
            "H removal (no labels)": read_structures(d / "test_H_removal.xyz",
                                                     require_energy=False, require_forces=False),
        }, "in distribution (test_MD)"
    if dataset == "water":
        return {"in distribution (central densities, held out)": list(data.test),
                "low density (< 0.79 g/cm³)": read_structures(WATER_DATA / "low.extxyz"),
                "high density (> 1.06 g/cm³)": read_structures(WATER_DATA / "high.extxyz"),
                }, "in distribution (central densities, held out)"
    d = DATA / "3bpa"
    seen = {np.round(s.positions, 5).tobytes() for s in read_structures(d / "train_300K.xyz")}
    mixed = [s for s in read_structures(d / "train_mixedT.xyz")
             if np.round(s.positions, 5).tobytes() not in seen]
    return {"in distribution (300 K, held out)": list(data.test),
            "mixed T (300/600/1200 K, unseen)": mixed}, "in distribution (300 K, held out)"


def one_scale(fd, validation, batch_size: int = 32):
    """The ablation: the feature-distance model with one variance scale only (epistemic scale
    1), fitted by NLL on the validation set like the paper's e2IP."""
    model = copy.deepcopy(fd)
    model.epistemic_scale.fill_(1.0)
    c = collect(model, validation, batch_size, forms=["raw"])
    model.variance_scale.fill_(fit_variance_scale(c.forms["raw"].predictive, c.forces_ref))
    return model


def kappa_diagnosis(model, structures) -> dict[str, float]:
    """How much of the paper's u_epi = tr(U_ale) / kappa is the aleatoric shape: the spread of
    log kappa against that of log u_ale, and their rank correlation over atoms."""
    p = model.predict(structures, form="raw")
    return {"std_log_kappa": float(np.log(p["kappa"]).std()),
            "std_log_u_ale": float(np.log(p["u_ale"]).std()),
            "spearman_u_epi_u_ale": float(stats.spearmanr(p["u_epi"], p["u_ale"])[0]),
            "mean_kappa": float(p["kappa"].mean())}


def models_of(dataset: str, seed: int, data, batch_size: int = 32):
    """{(method, variant): model} for the finished runs of one seed."""
    out = {}
    for method in ("e2ip", "eip", "ensemble"):
        path = run_dir(dataset, method, seed) / "model.pt"
        if not path.exists():
            continue
        model = load_model(path)
        out[(method, None)] = model
        if method == "e2ip":
            fd = model.with_feature_distance(data.train, batch_size)
            fd.calibrate(data.validation, batch_size)
            out[(method, "feature_distance")] = fd
            out[(method, "feature_distance_one_scale")] = one_scale(fd, data.validation,
                                                                     batch_size)
    return out




def config(dataset: str) -> Path:
    return ROOT / "experiments" / "configs" / f"shift_{dataset}.yaml"


def timings(models: dict, structures: list) -> dict[str, float]:
    """Inference ms/atom (energy, forces, every covariance), one thread, batch 32, beside a
    bare model of the same backbone (head none, untrained: the cost does not depend on the
    weights)."""
    torch.set_num_threads(1)
    e2ip = models[("e2ip", None)]
    spec = {**e2ip.spec(), "head": "none", "head_options": {}}
    bare = PotentialModel.from_spec(spec).eval()
    time_per_atom_ms(bare, structures)  # discarded: the process's first timing runs slow
    out = {"bare": time_per_atom_ms(bare, structures)}
    for (method, variant), model in models.items():
        if variant != "feature_distance_one_scale":  # the same model as feature_distance
            out[method + ("-" + variant if variant else "")] = time_per_atom_ms(model, structures)
    return out


def report(dataset: str, seeds: list[int], timing: bool = False) -> None:
    torch.set_num_threads(1)
    cfg, data = prepared(config(dataset))
    batch = cfg.data.eval_batch_size  # water: 4 boxes stay under the edge-chunking threshold
    sets, reference = test_sets(dataset, data)
    results: dict = {"dataset": dataset, "seeds": seeds, "rows": {}, "kappa": [],
                     "train_seconds": {}, "time_per_atom_ms": None,
                     "sets": {k: len(v) for k, v in sets.items()},
                     "machine": f"{platform.processor() or platform.machine()}, 1 torch thread"}
    start = time.time()
    for seed in seeds:
        models = models_of(dataset, seed, data, batch)
        if ("e2ip", None) in models:
            results["kappa"].append(kappa_diagnosis(models[("e2ip", None)], sets[reference]))
        for method in ("e2ip", "eip", "ensemble"):
            results["train_seconds"].setdefault(method, []).append(
                train_seconds(run_dir(dataset, method, seed)))
        for label, method, form, variant, aggregate in ROWS:
            model = models.get((method, variant))
            if model is None:
                continue
            row = results["rows"].setdefault(label, {})
            for name, structures in sets.items():
                labelled = structures[0].forces is not None
                ref = sets[reference] if name != reference else None
                if labelled:
                    metrics, _ = evaluate(model, structures, form=form, reference=ref,
                                          aggregate=aggregate, batch_size=batch)
                else:  # shift detection only: the metrics need labels, auc_reference does not
                    metrics = {"auc_reference": _auc_only(model, structures, ref, form,
                                                           aggregate, batch)}
                row.setdefault(name, []).append({k: metrics.get(k) for k in KEYS})
        print(f"seed {seed}: {time.time() - start:.0f} s", flush=True)
        if timing and seed == seeds[0] and ("e2ip", None) in models:
            results["time_per_atom_ms"] = timings(models, sets[reference][:256])
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"uncertainty_shift_{dataset}"
    if not timing and stem.with_suffix(".json").exists():  # keep the last measured timings
        results["time_per_atom_ms"] = json.loads(stem.with_suffix(".json").read_text()).get(
            "time_per_atom_ms")
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    stem.with_suffix(".md").write_text(markdown(results, sets, reference))
    print(f"written {stem}.json and .md")


def update_timing(dataset: str) -> None:
    """Measure the inference cost of seed 0's models alone (run it on an idle machine) and
    rewrite the report's cost table with it; the metrics are left as they are."""
    torch.set_num_threads(1)
    stem = RESULTS / f"uncertainty_shift_{dataset}"
    results = json.loads(stem.with_suffix(".json").read_text())
    cfg, data = prepared(config(dataset))
    sets, reference = test_sets(dataset, data)
    models = models_of(dataset, results["seeds"][0], data, cfg.data.eval_batch_size)
    results["time_per_atom_ms"] = timings(models, sets[reference][:256])
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    stem.with_suffix(".md").write_text(markdown(results, results["sets"], reference))
    print(results["time_per_atom_ms"])


def _auc_only(model, structures, reference, form, aggregate, batch_size: int) -> float:
    from e2ip.stats import metrics as M
    c = collect(model, structures, batch_size, forms=[form])
    r = collect(model, reference, batch_size, forms=[form])
    u, _ = M.per_structure(c.forms[form].u_epi, c.forces, c.batch, aggregate)
    u_ref, _ = M.per_structure(r.forms[form].u_epi, r.forces, r.batch, aggregate)
    return M.auc_reference(u, u_ref)


def markdown(results: dict, sets: dict, reference: str) -> str:
    lines = [f"# Uncertainty under distribution shift: {results['dataset']}", "",
             f"Seeds {results['seeds']} (mean ± std over the seeds that finished); "
             f"{results['machine']}. Made by `python experiments/uncertainty_shift.py report "
             f"--dataset {results['dataset']}`. Per-structure uncertainty: mean of the per-atom "
             "u_epi (max where the row says so). AUC shift: ROC-AUC for telling the set's "
             f"structures from the in-distribution set ({reference}) by that uncertainty.", ""]
    for name in sets:
        keys = [k for k in KEYS if any(r.get(k) is not None for per_set in results["rows"].values()
                                       for r in per_set.get(name, []))]
        lines += [f"## {name} ({results['sets'][name]} structures)", "",
                  "| method | n | " + " | ".join(HEADERS[k] for k in keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for label, per_set in results["rows"].items():
            runs = per_set.get(name, [])
            if not runs:
                continue
            cells = [mean_std([r[k] for r in runs]) for k in keys]
            if all(c == "" for c in cells):
                continue
            lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
        lines.append("")
    if results["kappa"]:
        k = results["kappa"]
        lines += ["## Where the paper's u_epi comes from", "",
                  f"On the in-distribution set, over atoms: std(log kappa) = "
                  f"{mean_std([x['std_log_kappa'] for x in k])}, std(log u_ale) = "
                  f"{mean_std([x['std_log_u_ale'] for x in k])}, mean kappa = "
                  f"{mean_std([x['mean_kappa'] for x in k])}; Spearman(u_epi, u_ale) = "
                  f"{mean_std([x['spearman_u_epi_u_ale'] for x in k])}.", ""]
    lines += ["## Cost", "", "Training seconds over the runs timed from start to end (a resumed run "
              "is left out).", "", "| method | training s (1 thread) | inference ms/atom |",
              "|---|---|---|"]
    timing = results.get("time_per_atom_ms") or {}
    for method, secs in results["train_seconds"].items():
        lines.append(f"| {method} | {mean_std(secs)} | "
                     f"{timing.get(method, float('nan')):.3f} |")
    if timing:
        lines.append(f"| e2ip-feature_distance | (the e2ip run + one forward pass over the "
                     f"training set) | {timing.get('e2ip-feature_distance', float('nan')):.3f} |")
        lines.append(f"| bare PaiNN (head none) | | {timing['bare']:.3f} |")
    return "\n".join(lines) + "\n"
