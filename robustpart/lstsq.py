"""Least-squares sums accumulated batch by batch, and the ridge fit they give (compensation's
reconstructions and the pipeline adapters both fit this way)."""
from __future__ import annotations

import torch


class CrossMoments:
    """Sums for a least-squares fit of targets T on sources S over rows seen batch by batch.

    The products are float32 matrix multiplies (half the time of float64 on a CPU) of the data shifted by
    the first batch's means; the sums are kept in float64. Shifting removes the cancellation that makes a
    raw float32 Gram matrix of post-ReLU activations inaccurate: the shifted Gram matches the float64 one
    to ~1e-7 relative, the unshifted one only to ~1e-4."""

    def __init__(self):
        self.n, self.s, self.t, self.ss, self.st = 0, 0.0, 0.0, 0.0, 0.0
        self.shift_s: torch.Tensor | None = None
        self.shift_t: torch.Tensor | None = None

    def add(self, source: torch.Tensor, target: torch.Tensor) -> None:
        source, target = source.float(), target.float()
        if self.shift_s is None:
            self.shift_s, self.shift_t = source.mean(0), target.mean(0)
        source, target = source - self.shift_s, target - self.shift_t
        self.n += len(source)
        self.s = self.s + source.sum(0, dtype=torch.float64)
        self.t = self.t + target.sum(0, dtype=torch.float64)
        self.ss = self.ss + (source.T @ source).double()
        self.st = self.st + (source.T @ target).double()

    def centred(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """mean of S, mean of T, Cov(S, S), Cov(S, T) (population)."""
        mean_s, mean_t = self.s / self.n, self.t / self.n
        return (mean_s + self.shift_s.double(), mean_t + self.shift_t.double(),
                self.ss / self.n - torch.outer(mean_s, mean_s), self.st / self.n - torch.outer(mean_s, mean_t))

    def ridge_fit(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Coefficients [S, T] and intercept [T] of the ridge regression of T on S; `ridge` is relative to
        the mean variance of the sources. The ridge makes the system positive definite: Cholesky, half the
        work of a general solve."""
        mean_s, mean_t, gram, cross = self.centred()
        lam = ridge * float(torch.diagonal(gram).mean()) + 1e-12
        system = gram + lam * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
        factor, info = torch.linalg.cholesky_ex(system)
        coef = torch.cholesky_solve(cross, factor) if int(info) == 0 else torch.linalg.solve(system, cross)
        return coef, mean_t - mean_s @ coef

    def sparse_ridge_fit(self, ridge: float, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each target regressed on its `k` most correlated sources only: (index [T, k] of the sources in
        ascending order, coefficients [T, k], intercept [T]). The sources are ranked by |Cov(s, t)| / std(s)
        (the correlation up to the target's own scale), then each target's k x k ridge system is solved
        (the same ridge as `ridge_fit`), so the coefficients are the best fit on those sources."""
        mean_s, mean_t, gram, cross = self.centred()
        lam = ridge * float(torch.diagonal(gram).mean()) + 1e-12
        strength = cross.abs() / torch.sqrt(torch.diagonal(gram) + lam)[:, None]        # [S, T]
        index = strength.topk(k, dim=0).indices.T.sort(dim=1).values                    # [T, k]
        system = gram[index[:, :, None], index[:, None, :]]                              # [T, k, k]
        system = system + lam * torch.eye(k, dtype=gram.dtype, device=gram.device)
        rhs = torch.gather(cross.T, 1, index)                                            # [T, k]
        coef = torch.linalg.solve(system, rhs[..., None])[..., 0]
        return index, coef, mean_t - (mean_s[index] * coef).sum(1)
