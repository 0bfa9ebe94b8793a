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

#: (row label, trained method, post-hoc variant, whether its raw form is a row of its own); every
#: row is evaluated in the form "cal" and, from the same pass, "raw"
ROWS = [
    ("e2IP (paper)", "e2ip", None, True),
    ("e2IP-FD 0.2 (uncentred, pooled)", "e2ip", "fd_uncentred", True),
    ("e2IP-FD (centred)", "e2ip", "fd_centred", True),
    ("e2IP-FD (centred, per element)", "e2ip", "fd_per_element", True),
    ("e2IP-FD (centred), calibrated on the r-tail", "e2ip", "fd_tail", False),
    ("eIP", "eip", None, True),
    ("Ensemble x5 (NLL)", "ensemble", None, True),
    ("Ensemble x5 (paper floor)", "ensemble", "paper_floor", False),
    ("Het. ensemble x5 (NLL)", "het_ensemble", None, True),
]
#: the feature-distance variants: head options on top of `evidence: feature_distance`
FD_VARIANTS = {"fd_uncentred": {"feature_centred": False, "feature_per_element": False},
               "fd_centred": {"feature_centred": True, "feature_per_element": False},
               "fd_per_element": {"feature_centred": True, "feature_per_element": True}}
TAIL_FRACTION = 1 / 3  # fd_tail: calibrated on this fraction of validation frames with highest r
KEYS = ["force_mae", "coverage_95", "calibration_error", "nll", "spearman",
        "spearman_per_structure", "auc_worst10", "ause_per_structure", "auc_reference",
        "above_threshold"]
HEADERS = {"force_mae": "MAE (eV/Å)", "coverage_95": "Cov@95", "calibration_error": "CE",
           "nll": "NLL", "spearman": "ρ atom", "spearman_per_structure": "ρ struct",
           "auc_worst10": "AUC worst10", "ause_per_structure": "AUSE struct",
           "auc_reference": "AUC shift", "above_threshold": "> threshold"}


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
    if dataset == "si_zeo22":
        d = DATA / "si_zeo22"
        return {"in distribution (10 topologies, other frames)": list(data.test),
                "6 new topologies": read_structures(d / "test_new_topologies.xyz"),
                }, "in distribution (10 topologies, other frames)"
    d = DATA / "3bpa"
    seen = {np.round(s.positions, 5).tobytes() for s in read_structures(d / "train_300K.xyz")}
    mixed = [s for s in read_structures(d / "train_mixedT.xyz")
             if np.round(s.positions, 5).tobytes() not in seen]
    return {"in distribution (300 K, held out)": list(data.test),
            "mixed T (300/600/1200 K, unseen)": mixed}, "in distribution (300 K, held out)"


def with_distance(e2ip_model, options: dict, data, batch_size: int):
    """The trained e2IP weights with a feature-distance evidence of `options`, fitted on the
    training set and calibrated on the validation set."""
    spec = e2ip_model.spec()
    spec["head_options"] = {**spec["head_options"], **options}
    base = type(e2ip_model).from_spec(spec)
    base.load_state_dict(e2ip_model.state_dict())
    fd = base.with_feature_distance(data.train, batch_size)
    fd.calibrate(data.validation, batch_size)
    return fd


def tail_calibrated(fd, validation, batch_size: int):
    """A copy of `fd` calibrated on the TAIL_FRACTION of validation structures whose mean
    feature distance r is highest (the candidate 'calibrate where the shift begins')."""
    r = fd.predict(validation, batch_size=batch_size)["feature_distance"]
    bounds = np.cumsum([0] + [s.n_atoms for s in validation])
    mean_r = np.array([r[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:])])
    keep = np.argsort(-mean_r)[:max(2, int(round(TAIL_FRACTION * len(validation))))]
    model = copy.deepcopy(fd)
    model.calibrate([validation[k] for k in sorted(keep)], batch_size)
    return model


def offset_ratio(fd, data, batch_size: int) -> float:
    """|mu|^2 / tr(S) of the backbone's invariant features over the training atoms (mu, S their
    mean and covariance): how much a common offset dominated the uncentred ridge of e2ip 0.2.
    `fd`: the centred feature-distance model (its fitted centre is checked against mu)."""
    feats = []
    with torch.no_grad():
        from e2ip.data.graph import GraphDataset
        for g in GraphDataset(data.train, fd.cutoff).loader(batch_size, dtype=fd.dtype):
            feats.append(fd.backbone(fd.species(g.numbers), g.edge_index,
                                     g.edge_vectors(g.positions), g.batch,
                                     g.num_graphs).scalars.double())
    h = torch.cat(feats)
    mu = h.mean(0)
    assert torch.allclose(mu, fd.head.feature_distance.center[0].double(), rtol=1e-4, atol=1e-6)
    return float(mu.square().sum() / h.var(0, unbiased=False).sum())


def kappa_diagnosis(model, structures) -> dict[str, float]:
    """How much of the paper's u_epi = tr(U_ale) / kappa is the aleatoric shape: the spread of
    log kappa against that of log u_ale, and their rank correlation over atoms."""
    p = model.predict(structures, form="raw")
    return {"std_log_kappa": float(np.log(p["kappa"]).std()),
            "std_log_u_ale": float(np.log(p["u_ale"]).std()),
            "spearman_u_epi_u_ale": float(stats.spearmanr(p["u_epi"], p["u_ale"])[0]),
            "mean_kappa": float(p["kappa"].mean())}


def models_of(dataset: str, seed: int, data, batch_size: int = 32):
    """{(method, variant): model} for the finished runs of one seed, every one calibrated on
    the validation set (ensembles recalibrated here, so runs trained before the NLL form
    existed, or assembled from members trained elsewhere, are calibrated alike)."""
    from e2ip.models.ensemble import Ensemble

    out = {}
    for method in ("e2ip", "eip", "ensemble", "het_ensemble"):
        folder = run_dir(dataset, method, seed)
        path = folder / "model.pt"
        if not path.exists() and (folder / "member_0" / "model.pt").exists():
            members = sorted(folder.glob("member_*/model.pt"))
            model = Ensemble([load_model(m) for m in members])  # members trained side by side
        elif path.exists():
            model = load_model(path)
        else:
            continue
        if method.endswith("ensemble"):
            model.calibration_form = "nll"
            model.calibrate(data.validation, batch_size)
            if method == "ensemble":
                floor = copy.deepcopy(model)
                floor.calibration_form = "paper_floor"
                floor.calibrate(data.validation, batch_size)
                out[(method, "paper_floor")] = floor
        out[(method, None)] = model
        if method == "e2ip":
            for variant, options in FD_VARIANTS.items():
                out[(method, variant)] = with_distance(model, options, data, batch_size)
            out[(method, "fd_tail")] = tail_calibrated(out[(method, "fd_centred")],
                                                       data.validation, batch_size)
    return out


def above_threshold(model, arrays, structures) -> float | None:
    """The fraction of structures whose largest per-atom forces_uncertainty (cal) passes the
    model's stored stop_threshold."""
    if model.stop_threshold is None:
        return None
    bounds = np.cumsum([0] + [s.n_atoms for s in structures])
    top = np.array([arrays["sigma_epi"][a:b].max() for a, b in zip(bounds[:-1], bounds[1:])])
    return float(np.mean(top > model.stop_threshold))


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
        if variant != "fd_tail":  # the same model as fd_centred
            out[method + ("-" + variant if variant else "")] = time_per_atom_ms(model, structures)
    return out


def report(dataset: str, seeds: list[int], timing: bool = False, suffix: str = "") -> None:
    torch.set_num_threads(1)
    cfg, data = prepared(config(dataset))
    batch = cfg.data.eval_batch_size  # water: 4 boxes stay under the edge-chunking threshold
    sets, reference = test_sets(dataset, data)
    results: dict = {"dataset": dataset, "seeds": seeds, "rows": {}, "kappa": [],
                     "train_seconds": {}, "time_per_atom_ms": None,
                     "sets": {k: len(v) for k, v in sets.items()},
                     "machine": f"{platform.processor() or platform.machine()}, 1 torch thread"}
    results["calibration"], results["offset_ratio"] = {}, []
    start = time.time()
    for seed in seeds:
        models = models_of(dataset, seed, data, batch)
        if ("e2ip", None) in models:
            results["kappa"].append(kappa_diagnosis(models[("e2ip", None)], sets[reference]))
            results["offset_ratio"].append(offset_ratio(models[("e2ip", "fd_centred")], data,
                                                        batch))
        for method in ("e2ip", "eip", "ensemble", "het_ensemble"):
            results["train_seconds"].setdefault(method, []).append(
                train_seconds(run_dir(dataset, method, seed)))
        for label, method, variant, raw_row in ROWS:
            model = models.get((method, variant))
            if model is None:
                continue
            results["calibration"].setdefault(label, []).append(model.calibration())
            for name, structures in sets.items():
                labelled = structures[0].forces is not None
                ref = sets[reference] if name != reference else None
                if not labelled:  # shift detection only: the metrics need labels, the AUC not
                    for form in ("cal", "raw") if raw_row else ("cal",):
                        auc = _auc_only(model, structures, ref, form, "mean", batch)
                        results["rows"].setdefault(f"{label} ({form})", {}).setdefault(
                            name, []).append({"auc_reference": auc})
                    continue
                metrics, arrays = evaluate(model, structures, form="cal", reference=ref,
                                           batch_size=batch)
                row = {k: metrics.get(k) for k in KEYS}
                row["above_threshold"] = above_threshold(model, arrays, structures)
                results["rows"].setdefault(f"{label} (cal)", {}).setdefault(name, []).append(row)
                if raw_row:
                    raw = {k: metrics["raw"].get(k) for k in KEYS if k in metrics["raw"]}
                    raw["force_mae"] = metrics.get("force_mae")
                    results["rows"].setdefault(f"{label} (raw)", {}).setdefault(
                        name, []).append(raw)
        print(f"seed {seed}: {time.time() - start:.0f} s", flush=True)
        if timing and seed == seeds[0] and ("e2ip", None) in models:
            results["time_per_atom_ms"] = timings(models, sets[reference][:256])
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"uncertainty_shift_{dataset}{suffix}"
    if not timing and stem.with_suffix(".json").exists():  # keep the last measured timings
        results["time_per_atom_ms"] = json.loads(stem.with_suffix(".json").read_text()).get(
            "time_per_atom_ms")
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    stem.with_suffix(".md").write_text(markdown(results, sets, reference))
    print(f"written {stem}.json and .md")


def summary_table(results: dict) -> str:
    """The issue-25 summary: per method (form cal, raw in brackets where reported) the
    in-distribution CE and NLL, and per shifted set Cov@95, CE, per-structure Spearman and
    shift AUC (mean ± std over seeds)."""
    reference, *shifted = results["sets"]
    labelled = [n for n in shifted if any(r.get("coverage_95") is not None
                                          for rows in results["rows"].values()
                                          for r in rows.get(n, []))]
    head = ["method", "ID CE", "ID NLL"]
    for name in shifted:
        short = name.split(" (")[0]
        head += ([f"{short} Cov@95", f"{short} CE", f"{short} ρ struct"]
                 if name in labelled else []) + [f"{short} AUC"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(label: str, name: str, key: str, digits: int | None = None) -> str:
        value = mean_std([r.get(key) for r in results["rows"].get(label, {}).get(name, [])],
                         digits)
        raw = results["rows"].get(label.replace("(cal)", "(raw)"), {}).get(name, [])
        if label.endswith("(cal)") and key in ("coverage_95", "calibration_error") and raw:
            value += f" ({mean_std([r.get(key) for r in raw], digits)})"
        return value

    for label in results["rows"]:
        if label.endswith("(raw)"):
            continue
        row = [label.removesuffix(" (cal)"), cell(label, reference, "calibration_error"),
               cell(label, reference, "nll")]
        for name in shifted:
            if name in labelled:
                row += [cell(label, name, "coverage_95"), cell(label, name, "calibration_error"),
                        cell(label, name, "spearman_per_structure")]
            row.append(cell(label, name, "auc_reference"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def rewrite_markdown(dataset: str, suffix: str = "") -> None:
    """The .md of a report again from its .json (the first set is the in-distribution one)."""
    stem = RESULTS / f"uncertainty_shift_{dataset}{suffix}"
    results = json.loads(stem.with_suffix(".json").read_text())
    stem.with_suffix(".md").write_text(markdown(results, results["sets"],
                                                next(iter(results["sets"]))))
    print(f"written {stem}.md")


def update_timing(dataset: str, suffix: str = "") -> None:
    """Measure the inference cost of seed 0's models alone (run it on an idle machine) and
    rewrite the cost table of the report uncertainty_shift_<dataset><suffix> with it; the
    metrics are left as they are."""
    torch.set_num_threads(1)
    stem = RESULTS / f"uncertainty_shift_{dataset}{suffix}"
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
            cells = [mean_std([r.get(k) for r in runs]) for k in keys]
            if all(c == "" for c in cells):
                continue
            lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
        lines.append("")
    if results.get("calibration"):
        lines += ["## Fitted calibration (validation set)", "",
                  "Every row's form `cal`: the method, its value (s or s^2), the epistemic "
                  "scale t and the stored stop threshold (eV/Å), mean ± std over the seeds.", "",
                  "| method | calibration | value | t | stop threshold |", "|---|---|---|---|---|"]
        for label, fits in results["calibration"].items():
            fits = [f for f in fits if f]
            if fits:
                lines.append(f"| {label} | {fits[0]['method']} | "
                             f"{mean_std([f['value'] for f in fits], 4)} | "
                             f"{mean_std([f.get('epistemic_scale') for f in fits], 4)} | "
                             f"{mean_std([f.get('stop_threshold') for f in fits], 4)} |")
        lines.append("")
    if results.get("offset_ratio"):
        lines += [f"Common offset of the trained backbone's invariant features over the training "
                  f"atoms, |mu|^2 / tr(cov): {mean_std(results['offset_ratio'], 2)} (the "
                  "uncentred ridge of e2ip 0.2 was relative to tr(cov) + |mu|^2).", ""]
    if results["kappa"]:
        k = results["kappa"]
        lines += ["## Where the paper's u_epi comes from", "",
                  f"On the in-distribution set, over atoms: std(log kappa) = "
                  f"{mean_std([x['std_log_kappa'] for x in k])}, std(log u_ale) = "
                  f"{mean_std([x['std_log_u_ale'] for x in k])}, mean kappa = "
                  f"{mean_std([x['mean_kappa'] for x in k])}; Spearman(u_epi, u_ale) = "
                  f"{mean_std([x['spearman_u_epi_u_ale'] for x in k])}.", ""]
    lines += ["## Cost", "", "Training seconds over the runs timed from start to end (a resumed run "
              "is left out; an ensemble's members trained as separate jobs are summed).",
              *([results["train_note"]] if results.get("train_note") else []), "",
              "| method | training s | inference ms/atom (1 thread) |", "|---|---|---|"]
    timing = results.get("time_per_atom_ms") or {}
    for method, secs in results["train_seconds"].items():
        lines.append(f"| {method} | {mean_std(secs)} | "
                     f"{timing.get(method, float('nan')):.3f} |")
    for key, value in timing.items():  # the e2ip weights with a feature distance, the floor
        if key not in results["train_seconds"] and key != "bare":
            lines.append(f"| {key} | (the {key.split('-')[0]} run"
                         + (" + one forward pass over the training set" if "fd" in key else "")
                         + f") | {value:.3f} |")
    if timing:
        lines.append(f"| bare PaiNN (head none) | | {timing['bare']:.3f} |")
    return "\n".join(lines) + "\n"
