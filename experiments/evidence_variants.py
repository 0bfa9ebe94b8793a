"""The untried candidates of issue 25 for coverage under shift in one pass, on the trained e2IP
weights of the uncertainty_shift runs, beside the default (centred, per-element distance):

- **LLPR** (last-layer prediction rigidity, Bigi et al. 2024, structure-level Hessian): the
  distance r_i = z_iᵀ (Σ_s f_s f_sᵀ / S + ς² I)⁻¹ z_i with z_i = [h_i, 1] (the backbone's
  invariant features, which its energy readout sees, plus an intercept) and f_s = Σ_{i in s} z_i
  the structure-level features an energy label constrains; pooled over elements, as in the paper;
- **LLPR (last layer)**, added later (issue 25 names it): the same form on the energy readout's
  last hidden layer, z_i = [readout[:-1](h_i), 1], the features the final linear layer of the
  atomic energy sees, which is where Bigi et al. take them;
- **GMM**: per element a Gaussian mixture of K components (EM), r = 1 + m_eff normalised to mean
  1 on the training atoms, m_eff = -2 log Σ_k π_k |C_k|^-1/2 exp(-m_k / 2) + 2 log Σ_k π_k
  |C_k|^-1/2 (>= 0; exactly the Mahalanobis distance m for K = 1);
- **conformal by r**: the default's calibrated predictive, every covariance of an atom times the
  split-conformal factor of its r-bin (B quantile bins of the validation atoms' r; atoms beyond
  the last edge take the last bin's factor), so Cov@95 = 0.95 in every bin of the validation set;
  and, added after its first result, the **NLL scale by r-bin**: per bin the variance factor that
  minimises the bin's NLL on the validation set (it keeps the shape where conformal fixes one
  level; computed by the library's `fit_r_bin_factors`, what `head.calibration_r_bins` fits).

Every variant keeps the head's two NLL-fitted scales (s, t) on the validation set. The constants
(K = 4, B = 5, ridge 1e-3 of the mean variance, 10 F training atoms per mixture component) were
fixed before any result was seen; no set was used to choose them.

    python experiments/evidence_variants.py --dataset ethanol --seeds 0 1 2

writes docs/results/evidence_variants_<dataset>.json (per seed and set: force MAE, CE, Cov@95,
NLL, per-structure Spearman, shift AUC; the fitted scales, conformal factors and mixture sizes);
`--table` prints its summary as markdown. `--only "LLPR (last layer)"` computes that variant
alone and merges it into the written file (the other variants' numbers stay as they were).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time

import numpy as np
import torch
from report_shift import FD_VARIANTS, config, test_sets, with_distance
from runner import RESULTS, mean_std, prepared, run_dir
from scipy import stats
from torch import nn

from e2ip.evaluation.evaluate import collect
from e2ip.heads.feature_distance import FeatureDistance
from e2ip.models.io import load_model
from e2ip.stats import metrics as M
from e2ip.stats.calibration import fit_r_bin_factors
from e2ip.stats.predictive import StudentT

COMPONENTS = 4  # GMM: components per element (fewer where an element has few atoms)
ATOMS_PER_COMPONENT_FEATURE = 10  # GMM: a component needs 10 F training atoms
BINS = 5  # conformal: quantile bins of the validation atoms' r
RIDGE = 1e-3  # relative to the mean (centred) feature variance, as the library's distance
LEVEL = 0.95
VARIANTS = ["default (per element)", "pooled (centred)", "LLPR", "LLPR (last layer)", "GMM"]
RESCALINGS = ["conformal by r", "NLL scale by r-bin"]  # factors on top of the default
METRIC_KEYS = ["force_mae", "calibration_error", "coverage_95", "nll", "spearman_per_structure",
               "auc_reference"]


# ------------------------------------------------------------------------------- features
@torch.no_grad()
def features(model, structures, batch_size: int):
    """[(h (n, F) float64, species (n,), structure index (n,), number of structures)] per batch:
    the backbone's invariant features, what the head's feature distance sees."""
    out = []
    for g in model.graphs(structures, batch_size):
        species = model.species(g.numbers)
        h = model.backbone(species, g.edge_index, g.edge_vectors(g.positions), g.batch,
                           g.num_graphs).scalars
        out.append((h.double(), species, g.batch, g.num_graphs))
    return out


# ------------------------------------------------------------------------------------ LLPR
def fit_llpr(distance, batches) -> None:
    """Set a pooled FeatureDistance's buffers to the structure-level LLPR form: with
    Q = (Σ_s f_s f_sᵀ / S + ς² I)⁻¹ over z = [h, 1], z_iᵀ Q z_i = (h - c)ᵀ A (h - c) + d', where
    A = Q[:F, :F], b = Q[:F, F], c = -A⁻¹ b, d' = Q[F, F] - cᵀ A c (completing the square, so
    the library's forward |W (h - c)|² + offset computes it unchanged); normalised to mean 1."""
    f_dim = batches[0][0].shape[1]
    sums = []
    for h, _, index, n in batches:
        z = torch.cat([h, torch.ones_like(h[:, :1])], 1)
        sums.append(torch.zeros(n, f_dim + 1, dtype=z.dtype).index_add_(0, index, z))
    fs = torch.cat(sums)
    hessian = fs.T @ fs / len(fs)
    centred = fs[:, :f_dim] - fs[:, :f_dim].mean(0)
    ridge = RIDGE * float(centred.square().sum(1).mean()) / f_dim
    q = torch.linalg.inv(hessian + ridge * torch.eye(f_dim + 1, dtype=fs.dtype))
    a, b, d = q[:f_dim, :f_dim], q[:f_dim, f_dim], q[f_dim, f_dim]
    c = -torch.linalg.solve(a, b)
    offset = d - c @ a @ c
    eigval, eigvec = torch.linalg.eigh(a)
    whitening = (eigvec * eigval.clamp_min(0).sqrt()).T  # Wᵀ W = A
    h_all = torch.cat([b_[0] for b_ in batches])
    norm = float((offset + ((h_all - c) @ whitening.T).square().sum(1)).mean())
    distance.center[0] = c
    distance.whitening[0] = whitening / math.sqrt(norm)
    distance.offset[0] = offset / norm
    distance.fitted.fill_(True)


class LastLayerDistance(nn.Module):
    """r (N,) of the LLPR form on the energy readout's last hidden layer: z = hidden(h) (N, H),
    then a pooled FeatureDistance over z whose buffers :func:`fit_llpr` sets. `hidden` is a copy
    of the backbone's readout without its final linear layer (frozen)."""

    def __init__(self, hidden: nn.Module, num_hidden: int):
        super().__init__()
        self.hidden = hidden.requires_grad_(False)
        self.quadratic = FeatureDistance(num_hidden, centred=True, num_groups=1)

    @property
    def fitted(self) -> torch.Tensor:
        return self.quadratic.fitted

    def forward(self, h: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        dtype = next(self.hidden.parameters()).dtype
        return self.quadratic(self.hidden(h.to(dtype)).to(h.dtype))


def last_layer_llpr(readout: nn.Sequential, batches) -> LastLayerDistance:
    """A fitted :class:`LastLayerDistance` for an MLP `readout` (Linear, act, ..., Linear) from
    the training batches of :func:`features`."""
    hidden = copy.deepcopy(readout[:-1])
    distance = LastLayerDistance(hidden, readout[-1].in_features)
    dtype = next(hidden.parameters()).dtype
    with torch.no_grad():
        z_batches = [(hidden(h.to(dtype)).double(), species, index, n)
                     for h, species, index, n in batches]
    fit_llpr(distance.quadratic, z_batches)
    return distance


# ------------------------------------------------------------------------------------- GMM
class MixtureDistance(nn.Module):
    """r (N,) from a per-element Gaussian mixture of the features (see the module docstring).
    Buffers per group g and component k (in the group's whitened coordinates x = P_g (h - mu_g)):
    means (G, K, F), whitening (G, K, F, F) (Wᵀ W = C_k⁻¹), log_weight (G, K) = log π_k
    - log|C_k| / 2 (-inf for an unused component), floor (G,), norm (G,)."""

    def __init__(self, num_groups: int, num_features: int, components: int):
        super().__init__()
        g, k, f = num_groups, components, num_features
        self.register_buffer("mu", torch.zeros(g, f, dtype=torch.float64))
        self.register_buffer("proj", torch.zeros(g, f, f, dtype=torch.float64))
        self.register_buffer("means", torch.zeros(g, k, f, dtype=torch.float64))
        self.register_buffer("whitening", torch.zeros(g, k, f, f, dtype=torch.float64))
        self.register_buffer("log_weight", torch.full((g, k), -math.inf, dtype=torch.float64))
        self.register_buffer("floor", torch.zeros(g, dtype=torch.float64))
        self.register_buffer("norm", torch.ones(g, dtype=torch.float64))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def m_eff(self, h: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        h = h.double()
        x = torch.einsum("gef,ngf->nge", self.proj, h[:, None, :] - self.mu[None])  # (n, G, F)
        # every group's components, then each atom's own group: G K small products per atom
        z = (torch.einsum("gkef,ngf->ngke", self.whitening, x)
             - torch.einsum("gkef,gkf->gke", self.whitening, self.means))
        m = z.square().sum(-1)[torch.arange(len(h)), groups]  # (n, K)
        log_p = torch.logsumexp(self.log_weight[groups] - m / 2, dim=1)
        return (-2 * log_p - self.floor[groups]).clamp_min(0)

    def forward(self, h: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        r = (1 + self.m_eff(h, groups)) / self.norm[groups]
        return r.to(h.dtype)


def em(x: torch.Tensor, k: int, iterations: int = 100, seed: int = 0):
    """Gaussian mixture of x (n, F) (whitened: ridge 1e-3 on the component covariances) by EM:
    (weights (k,), means (k, F), covariances (k, F, F))."""
    gen = torch.Generator().manual_seed(seed)
    n, f = x.shape
    # k-means++ start: each next mean an atom drawn with probability ~ squared distance
    means = x[torch.randint(n, (1,), generator=gen)]
    for _ in range(1, k):
        d2 = torch.cdist(x, means).square().min(1).values
        means = torch.cat([means, x[torch.multinomial(d2 / d2.sum(), 1, generator=gen)]])
    covs = torch.eye(f, dtype=x.dtype).repeat(k, 1, 1)
    weights = torch.full((k,), 1 / k, dtype=x.dtype)
    eye = torch.eye(f, dtype=x.dtype)
    for _ in range(iterations):
        chol = torch.linalg.cholesky(covs)
        inv_chol = torch.linalg.inv(chol)  # (k, F, F): one product per component, not n solves
        sol = torch.einsum("kef,nf->nke", inv_chol, x) - torch.einsum("kef,kf->ke", inv_chol,
                                                                       means)
        log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        log_r = torch.log(weights) - 0.5 * (sol.square().sum(-1) + log_det)
        resp = torch.softmax(log_r, dim=1)  # (n, k)
        nk = resp.sum(0) + 1e-12
        weights = nk / n
        means = resp.T @ x / nk[:, None]
        diff = x[:, None, :] - means[None]
        covs = torch.einsum("nk,nke,nkf->kef", resp, diff, diff) / nk[:, None, None]
        covs = covs + RIDGE * eye
    return weights, means, covs


def fit_mixture(num_groups: int, batches) -> tuple[MixtureDistance, list[int]]:
    h = torch.cat([b[0] for b in batches])
    species = torch.cat([b[1] for b in batches])
    f = h.shape[1]
    dist = MixtureDistance(num_groups, f, COMPONENTS)
    sizes = []
    for g in range(num_groups):
        xg = h[species == g]
        if len(xg) < f:  # as the library's distance: too few atoms for a covariance, pooled
            xg = h
        mu = xg.mean(0)
        cov = torch.cov(xg.T, correction=0)
        cov = cov + RIDGE * float(cov.trace()) / f * torch.eye(f, dtype=cov.dtype)
        eigval, eigvec = torch.linalg.eigh(cov)
        proj = (eigvec / eigval.sqrt()).T  # whitened coordinates of this element
        x = (xg - mu) @ proj.T
        k = max(1, min(COMPONENTS, len(xg) // (ATOMS_PER_COMPONENT_FEATURE * f)))
        weights, means, covs = em(x, k)
        eigval, eigvec = torch.linalg.eigh(covs)
        whitening = (eigvec / eigval.sqrt()[:, None, :]).transpose(-1, -2)
        dist.mu[g], dist.proj[g] = mu, proj
        dist.means[g, :k], dist.whitening[g, :k] = means, whitening
        dist.log_weight[g, :k] = torch.log(weights) - 0.5 * torch.log(eigval).sum(-1)
        dist.floor[g] = -2 * torch.logsumexp(dist.log_weight[g, :k], 0)
        sizes.append(k)
    dist.fitted.fill_(True)
    with torch.no_grad():
        m = torch.cat([dist.m_eff(b[0], b[1]) for b in batches])
        for g in range(num_groups):
            sel = species == g
            if sel.any():
                dist.norm[g] = 1 + m[sel].mean()
    return dist, sizes


# ------------------------------------------------------------------------------- conformal
def conformal_factors(pred: StudentT, y: torch.Tensor, r: np.ndarray):
    """(bin edges (B-1,), factors (B,)): per quantile bin of r the split-conformal factor c_b on
    every covariance (the ceil((n+1) 0.95)-th smallest of m_i / (3 q_i), m_i the Mahalanobis
    distance of the error, q_i the 0.95 quantile of F(3, nu_i)), so Cov@95 >= 0.95 in each bin."""
    score = (pred.mahalanobis(y.to(pred.loc.dtype)).detach().double().numpy()
             / (3 * stats.f.ppf(LEVEL, 3, pred.dof.detach().double().numpy())))
    edges = np.quantile(r, np.linspace(0, 1, BINS + 1)[1:-1])
    which = np.searchsorted(edges, r)
    factors = []
    for b in range(BINS):
        s = np.sort(score[which == b])
        rank = min(len(s), math.ceil((len(s) + 1) * LEVEL))
        factors.append(float(s[rank - 1]))
    return edges, np.array(factors)


# --------------------------------------------------------------------------------- metrics
def set_metrics(pred, forces, forces_ref, u_epi, batch, u_ref_struct) -> dict[str, float]:
    unc = M.uncertainty_metrics(pred, forces_ref, u_epi, batch, n_samples=2)
    out = {"force_mae": float((forces - forces_ref).abs().mean()),
           "calibration_error": float(unc["calibration_error"]),
           "coverage_95": float(unc["coverage_95"]), "nll": float(unc["nll"]),
           "spearman_per_structure": float(unc["spearman_per_structure"])}
    if u_ref_struct is not None:
        out["auc_reference"] = float(M.auc_reference(unc["u_structure"], u_ref_struct))
    return out


def one_seed(dataset: str, seed: int, data, sets: dict, reference: str, batch: int,
             only: list[str] | None = None) -> dict:
    """One seed's metrics per set and variant (`only`: just these variants, default: all)."""
    wanted = only or [*VARIANTS, *RESCALINGS]
    unknown = set(wanted) - set(VARIANTS) - set(RESCALINGS)
    if unknown:
        raise SystemExit(f"unknown variant(s): {sorted(unknown)}; known: {VARIANTS + RESCALINGS}")
    e2ip = load_model(run_dir(dataset, "e2ip", seed) / "model.pt")
    default = with_distance(e2ip, FD_VARIANTS["fd_per_element"], data, batch)
    train_feats = features(default, data.train, batch)
    pooled_fit = []  # the pooled distance is fitted and calibrated once; each variant a copy

    def pooled():
        if not pooled_fit:
            pooled_fit.append(with_distance(e2ip, FD_VARIANTS["fd_centred"], data, batch))
        return copy.deepcopy(pooled_fit[0])

    def llpr():
        model = pooled()
        fit_llpr(model.head.feature_distance, train_feats)
        model.calibrate(data.validation, batch)
        return model

    def llpr_last_layer():
        model = pooled()
        model.head.feature_distance = last_layer_llpr(model.backbone.readout, train_feats)
        model.calibrate(data.validation, batch)
        return model

    def gmm():
        model = copy.deepcopy(default)
        model.head.feature_distance, sizes = fit_mixture(len(default.elements), train_feats)
        model.calibrate(data.validation, batch)
        model.mixture_sizes = sizes
        return model

    builders = dict(zip(VARIANTS, [lambda: default, pooled, llpr, llpr_last_layer, gmm]))
    models = {k: build() for k, build in builders.items() if k in wanted}
    sizes = getattr(models.get("GMM"), "mixture_sizes", None)
    # conformal by r on top of the default, fitted on the validation set
    cv = collect(default, data.validation, batch, ["cal"])
    r_val = default.predict(data.validation, batch)["feature_distance"]
    edges, conformal = conformal_factors(cv.forms["cal"].predictive, cv.forces_ref, r_val)
    # the library's r-bin calibration (head.calibration_r_bins) on the same bins
    _, binned = fit_r_bin_factors(cv.forms["cal"].predictive, cv.forces_ref,
                                  torch.from_numpy(r_val), BINS)
    binned = binned.numpy()
    rescalings = {k: v for k, v in {"conformal by r": conformal,
                                    "NLL scale by r-bin": binned}.items() if k in wanted}
    needs_default = bool(rescalings) and "default (per element)" not in models
    bases = {**models, **({"default (per element)": default} if needs_default else {})}

    out = {"calibration": {k: m.calibration() for k, m in models.items()},
           "gmm_components": sizes, "r_bin_edges": edges.tolist(),
           "r_bin_factors": {k: v.tolist() for k, v in rescalings.items()}, "sets": {}}
    collected = {name: {label: collect(m, structs, batch, ["cal"]) for label, m in bases.items()}
                 for name, structs in sets.items()}
    r_of = {name: default.predict(structs, batch)["feature_distance"]
            for name, structs in sets.items()}
    for name, structs in sets.items():
        if structs[0].forces is None:
            continue
        res = out["sets"][name] = {}
        for label in [*models, *rescalings]:
            base = label if label in models else "default (per element)"
            c, cref = collected[name][base], collected[reference][base]
            pred, u_epi = c.forms["cal"].predictive, c.forms["cal"].u_epi
            u_ref, ref_batch = cref.forms["cal"].u_epi, cref.batch
            if label in rescalings:
                factors = rescalings[label]
                factor = factors[np.searchsorted(edges, r_of[name])]
                factor = torch.as_tensor(factor)
                pred, u_epi = pred.scaled(factor), u_epi * factor
                u_ref = u_ref * torch.as_tensor(factors[np.searchsorted(edges, r_of[reference])])
            u_ref_struct = (None if name == reference
                            else M.per_structure(u_ref, cref.forces_ref, ref_batch)[0])
            res[label] = set_metrics(pred, c.forces, c.forces_ref, u_epi, c.batch, u_ref_struct)
            print(f"seed {seed} {name[:40]:40s} {label:22s} " + " ".join(
                f"{k} {v:.3f}" for k, v in res[label].items()), flush=True)
    return out


def merge(results: dict, seeds: dict) -> dict:
    """`results` (a written file) with the variants of `seeds` ({seed: one_seed(..., only)})
    added or replaced, per seed, set and calibration; every seed must be in both."""
    if set(seeds) != set(results["seeds"]):
        raise SystemExit(f"--only needs the file's seeds {sorted(results['seeds'])}, "
                         f"got {sorted(seeds)}")
    for seed, new in seeds.items():
        old = results["seeds"][seed]
        old["calibration"].update(new["calibration"])
        for name, variants in new["sets"].items():
            old["sets"][name].update(variants)
    return results


def summary(results: dict) -> dict:
    """{set: {variant: {metric: 'mean ± std'}}} over the seeds (std: population, as elsewhere)."""
    seeds = list(results["seeds"].values())
    out: dict = {}
    for name in seeds[0]["sets"]:
        for label in seeds[0]["sets"][name]:
            for key in METRIC_KEYS:
                vals = [s["sets"][name][label].get(key) for s in seeds]
                if all(v is not None for v in vals):
                    out.setdefault(name, {}).setdefault(label, {})[key] = mean_std(vals)
    return out


def table(results: dict) -> str:
    """Markdown: per variant the in-distribution CE and ρ struct, and per labelled shifted set
    Cov@95, CE, ρ struct and shift AUC (mean ± std over the seeds)."""
    reference, *shifted = results["summary"]
    head = ["variant", "ID CE", "ID ρ struct"]
    for name in shifted:
        short = name.split(" (")[0]
        head += [f"{short} Cov@95", f"{short} CE", f"{short} ρ struct", f"{short} AUC"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, ref in results["summary"][reference].items():
        row = [label, ref["calibration_error"], ref["spearman_per_structure"]]
        for name in shifted:
            m = results["summary"][name][label]
            row += [m["coverage_95"], m["calibration_error"], m["spearman_per_structure"],
                    m["auc_reference"]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--table", action="store_true",
                    help="print the markdown table of the written results, run nothing")
    ap.add_argument("--only", nargs="+", default=None, metavar="VARIANT",
                    help="compute these variants alone and merge them into the written file")
    args = ap.parse_args()
    path = RESULTS / f"evidence_variants_{args.dataset}.json"
    if args.table:
        print(table(json.loads(path.read_text())))
        return
    torch.set_num_threads(1)
    cfg, data = prepared(config(args.dataset))
    sets, reference = test_sets(args.dataset, data)
    start = time.time()
    seeds = {str(s): one_seed(args.dataset, s, data, sets, reference, cfg.data.eval_batch_size,
                              args.only) for s in args.seeds}
    if args.only:
        results = merge(json.loads(path.read_text()), seeds)
        results[f"seconds {' + '.join(args.only)}"] = time.time() - start
    else:
        results = {"dataset": args.dataset, "threads": 1,
                   "constants": {"components": COMPONENTS, "bins": BINS, "ridge": RIDGE},
                   "seeds": seeds}
        results["seconds"] = time.time() - start
    results["summary"] = summary(results)
    path.write_text(json.dumps(results, indent=1))
    print(f"written {path}")


if __name__ == "__main__":
    main()
