"""Precision of the damped Fisher's Cholesky factor: scores through an fp32 factor against an
fp64 one, over spectra and dampings, beside the condition-number bound (tr(F) + lam) / lam that
``grass.curvature.damped_cholesky`` uses to keep a factor in fp32.

    python -m bench.factor_precision

Synthetic features with power-law spectra (seeded): the Fisher F = phi^T phi / n of n rows,
64 test rows near the training distribution, scores test (F + lam I)^{-1} train^T.
"""

from __future__ import annotations

import torch

from .timing import format_table

K = 1024
DAMPINGS = (0.5, 0.05, 5e-3, 5e-4, 5e-5, 5e-6)
SPECTRA = ((1.0, 4096), (2.0, 4096), (3.0, 512))  # (power of i^-power, rows n)


def measure() -> list[dict]:
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(K, K, dtype=torch.float64))[0]
    rows = []
    for power, n in SPECTRA:
        scale = (torch.arange(1, K + 1, dtype=torch.float64) ** -power).sqrt()
        phi = (torch.randn(n, K, dtype=torch.float64) * scale) @ basis.T
        fisher = phi.T @ phi / n
        test = phi[:64] + 0.1 * (torch.randn(64, K, dtype=torch.float64) * scale) @ basis.T
        train = phi[64:]
        for relative in DAMPINGS:
            lam = relative * fisher.trace() / K
            damped = fisher + lam * torch.eye(K, dtype=torch.float64)
            factor = torch.linalg.cholesky(damped)
            exact = torch.cholesky_solve(test.T, factor).T @ train.T
            single = torch.cholesky_solve(test.float().T, factor.float()).T.double() @ train.T
            rows.append({
                "spectrum": f"i^-{power:g}, n = {n}", "relative damping": f"{relative:g}",
                "bound (tr F + lam) / lam": f"{float(fisher.trace() / lam + 1):.3g}",
                "condition": f"{float(torch.linalg.cond(damped)):.3g}",
                "fp32 / fp64 scores rel. err": f"{float((single - exact).norm() / exact.norm()):.2e}",
            })
    return rows


def main() -> None:
    rows = measure()
    print(f"k = {K}, scores of 64 test rows against the training rows:\n")
    print(format_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
