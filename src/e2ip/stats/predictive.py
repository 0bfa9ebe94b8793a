"""Per-atom predictive distributions of a 3-vector force, and what metrics need of them.

Every family offers `loc` (N, 3), `covariance()` (N, 3, 3), `nll(y)` (N,), `pit(y)` (N,) and
`sample(m)` (m, N, 3). PIT is the probability-integral transform of a rotation-invariant statistic
(docs/maths.md §7): calibrated forecasts give uniform PIT.
"""

from __future__ import annotations

import math

import torch
from scipy import stats

from e2ip.constants import DIM as D
from e2ip.stats.losses import quadratic_form


def _sym_sqrt(c: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of PSD matrices (N, 3, 3) via eigh (evaluation only, not training)."""
    w, v = torch.linalg.eigh(c)
    return (v * w.clamp_min(0).sqrt().unsqueeze(-2)) @ v.transpose(-1, -2)


def _randn(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normals drawn on the generator's device (reproducible), returned like `like`."""
    device = generator.device if generator is not None else like.device
    z = torch.randn(shape, generator=generator, dtype=torch.float64, device=device)
    return z.to(device=like.device, dtype=like.dtype)


def _chi2(dof: torch.Tensor, m: int, generator: torch.Generator | None) -> torch.Tensor:
    """(m, *dof.shape) chi-square draws with real degrees of freedom, from `generator`
    (torch.distributions.Chi2 cannot take a generator). Returned in float64 on dof's device."""
    device = generator.device if generator is not None else dof.device
    alpha = (dof.detach().to(device=device, dtype=torch.float64) / 2).expand(m, *dof.shape)
    return (2 * torch._standard_gamma(alpha.contiguous(), generator=generator)).to(dof.device)


class Predictive:
    loc: torch.Tensor

    def covariance(self) -> torch.Tensor:
        raise NotImplementedError

    def nll(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pit(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, m: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def rotate(self, r: torch.Tensor) -> Predictive:
        """The distribution of R y for per-atom rotations r (N, 3, 3)."""
        raise NotImplementedError

    def scaled(self, factor: float) -> Predictive:
        """The same family with every covariance multiplied by `factor` (> 0), location fixed."""
        raise NotImplementedError

    def __len__(self) -> int:
        return int(self.loc.shape[0])

    def detached(self) -> Predictive:
        """A float64 CPU copy of the same family without autograd history."""
        clone = object.__new__(type(self))
        for key, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu()
                value = value.double() if value.is_floating_point() else value
            setattr(clone, key, value)
        return clone


class StudentT(Predictive):
    """Multivariate Student-t t_dof(loc, scale): loc (N, 3), scale (N, 3, 3) SPD, dof (N,) > 2.

    `scale_inv` and `logdet` may be given (the e2IP head knows them in closed form)."""

    def __init__(self, loc, scale, dof, scale_inv=None, logdet=None):
        self.loc, self.scale, self.dof = loc, scale, dof
        self.scale_inv = torch.linalg.inv(scale) if scale_inv is None else scale_inv
        self.logdet = torch.linalg.slogdet(scale)[1] if logdet is None else logdet

    def covariance(self):
        return (self.dof / (self.dof - 2))[:, None, None] * self.scale

    def mahalanobis(self, y):
        return quadratic_form(y - self.loc, self.scale_inv)

    def nll(self, y):
        nu = self.dof
        delta = self.mahalanobis(y)
        return (torch.lgamma(nu / 2) - torch.lgamma((nu + D) / 2) + D / 2 * torch.log(nu * math.pi)
                + 0.5 * self.logdet + (nu + D) / 2 * torch.log1p(delta / nu))

    def pit(self, y):
        x = (self.mahalanobis(y) / D).detach().cpu().double().numpy()
        return torch.from_numpy(stats.f.cdf(x, D, self.dof.detach().cpu().double().numpy()))

    def sample(self, m, generator=None):
        """mu + L z sqrt(nu/g), z ~ N(0, I), g ~ chi2_nu, L L^T = scale; (m, N, 3).

        Reproducible for a given `generator` (both z and g are drawn from it)."""
        z = _randn((m, len(self), D), self.loc, generator)
        g = _chi2(self.dof, m, generator).to(self.loc.dtype)
        root = _sym_sqrt(self.scale.detach())
        radial = torch.sqrt(self.dof / g)[..., None]
        return self.loc + torch.einsum("nij,mnj->mni", root, z) * radial

    def rotate(self, r):
        rs = r @ self.scale @ r.transpose(-1, -2)
        return StudentT(torch.einsum("nij,nj->ni", r, self.loc), rs, self.dof, logdet=self.logdet)

    def scaled(self, factor):
        """Every scale times `factor`: a float, or a tensor (N,) of one factor per atom."""
        if isinstance(factor, torch.Tensor):
            f = factor.to(self.scale.dtype)
            return StudentT(self.loc, self.scale * f[:, None, None], self.dof,
                            scale_inv=self.scale_inv / f[:, None, None],
                            logdet=self.logdet + D * torch.log(f))
        return StudentT(self.loc, self.scale * factor, self.dof, scale_inv=self.scale_inv / factor,
                        logdet=self.logdet + D * math.log(factor))

    def select(self, mask: torch.Tensor) -> StudentT:
        """The atoms where `mask` (N,) bool is true."""
        return StudentT(self.loc[mask], self.scale[mask], self.dof[mask],
                        scale_inv=self.scale_inv[mask], logdet=self.logdet[mask])


class Gaussian(Predictive):
    """Multivariate normal N(loc, cov): loc (N, 3), cov (N, 3, 3)."""

    def __init__(self, loc, cov):
        self.loc, self.cov = loc, cov
        self.cov_inv = torch.linalg.inv(cov)
        self.logdet = torch.linalg.slogdet(cov)[1]

    def covariance(self):
        return self.cov

    def mahalanobis(self, y):
        return quadratic_form(y - self.loc, self.cov_inv)

    def nll(self, y):
        return 0.5 * (self.mahalanobis(y) + self.logdet + D * math.log(2 * math.pi))

    def pit(self, y):
        delta = self.mahalanobis(y).detach().cpu().double().numpy()
        return torch.from_numpy(stats.chi2.cdf(delta, D))

    def sample(self, m, generator=None):
        z = _randn((m, len(self), D), self.loc, generator)
        return self.loc + torch.einsum("nij,mnj->mni", _sym_sqrt(self.cov.detach()), z)

    def rotate(self, r):
        return Gaussian(torch.einsum("nij,nj->ni", r, self.loc), r @ self.cov @ r.transpose(-1, -2))

    def scaled(self, factor):
        return Gaussian(self.loc, self.cov * factor)


class IndependentStudentT(Predictive):
    """Independent Student-t per Cartesian axis (eIP): loc, scale, dof all (N, 3).

    Not rotation-covariant: its covariance is diagonal in the lab frame."""

    def __init__(self, loc, scale, dof, n_mc: int = 4000, seed: int = 0):
        self.loc, self.scale, self.dof = loc, scale, dof
        self.n_mc, self.seed = n_mc, seed

    def covariance(self):
        return torch.diag_embed(self.scale**2 * self.dof / (self.dof - 2))

    def scaled(self, factor):
        return IndependentStudentT(self.loc, self.scale * math.sqrt(factor), self.dof,
                                   n_mc=self.n_mc, seed=self.seed)

    def nll(self, y):
        z = (y - self.loc) / self.scale
        nu = self.dof
        per_axis = (torch.lgamma(nu / 2) - torch.lgamma((nu + 1) / 2)
                    + 0.5 * torch.log(nu * math.pi) + torch.log(self.scale)
                    + (nu + 1) / 2 * torch.log1p(z * z / nu))
        return per_axis.sum(-1)

    def _statistic(self, x):
        return (((x - self.loc) / self.scale) ** 2).sum(-1)

    def pit(self, y, chunk_elements: int = 2**22):
        """Monte-Carlo PIT of the standardised squared norm (docs/maths.md §7, 'any other family').

        The statistic sum_k t_k^2 does not depend on loc or scale, so only standard Student-t
        draws are needed; atoms are processed in chunks (at most `chunk_elements` draws each)."""
        gen = torch.Generator().manual_seed(self.seed)
        dof = self.dof.detach().cpu().double()
        obs = self._statistic(y).detach().cpu().double()
        out = torch.empty(len(self), dtype=torch.float64)
        step = max(1, chunk_elements // (self.n_mc * D))
        for s in range(0, len(self), step):
            t = _randn((self.n_mc, *dof[s:s + step].shape), dof, gen) * torch.sqrt(
                dof[s:s + step] / _chi2(dof[s:s + step], self.n_mc, gen))
            out[s:s + step] = ((t**2).sum(-1) <= obs[s:s + step]).double().mean(0)
        return out

    def sample(self, m, generator=None):
        """loc + scale * t, t standard Student-t per axis, drawn from `generator`; (m, N, 3)."""
        z = _randn((m, *self.loc.shape), self.loc, generator)
        g = _chi2(self.dof, m, generator).to(self.loc.dtype)
        return self.loc + self.scale * z * torch.sqrt(self.dof / g)


class Samples(Predictive):
    """An empirical predictive from samples (M, N, 3); PIT by Monte Carlo on the Mahalanobis
    distance under the sample mean and covariance."""

    def __init__(self, samples, jitter: float = 1e-12):
        self.samples = samples
        self.loc = samples.mean(0)
        dev = samples - self.loc
        self.cov = torch.einsum("mni,mnj->nij", dev, dev) / max(samples.shape[0] - 1, 1)
        self.cov = self.cov + jitter * torch.eye(D, dtype=samples.dtype)
        self.cov_inv = torch.linalg.inv(self.cov)

    def covariance(self):
        return self.cov

    def nll(self, y):
        return Gaussian(self.loc, self.cov).nll(y)

    def pit(self, y):
        stat_s = torch.einsum("mni,nij,mnj->mn", self.samples - self.loc, self.cov_inv,
                              self.samples - self.loc)
        stat_y = quadratic_form(y - self.loc, self.cov_inv)
        return (stat_s <= stat_y).double().mean(0).cpu()

    def sample(self, m, generator=None):
        idx = torch.randint(0, self.samples.shape[0], (m,), generator=generator)
        return self.samples[idx]


def concatenate(parts: list[Predictive]) -> Predictive:
    """Join per-batch predictives of one family along the atom axis."""
    first = parts[0]
    if isinstance(first, StudentT):
        return StudentT(*(torch.cat([getattr(p, k) for p in parts]) for k in
                          ("loc", "scale", "dof", "scale_inv", "logdet")))
    if isinstance(first, Gaussian):
        return Gaussian(torch.cat([p.loc for p in parts]), torch.cat([p.cov for p in parts]))
    if isinstance(first, IndependentStudentT):
        return IndependentStudentT(*(torch.cat([getattr(p, k) for p in parts])
                                     for k in ("loc", "scale", "dof")), n_mc=first.n_mc,
                                   seed=first.seed)
    if isinstance(first, Samples):
        return Samples(torch.cat([p.samples for p in parts], dim=1))
    raise TypeError(f"cannot concatenate {type(first).__name__}")

