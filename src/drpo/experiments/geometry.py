"""The trust-region geometry picture: each objective's per-token gradient weight
w = (dJ/dlog pi) / (A r) against the probability shift pi - mu and against the ratio r,
for A > 0 and A < 0, for a common (mu = 0.5) and a rare (mu = 0.01) token.

The weights come from autograd through :func:`drpo.policy_loss` itself, so the figure shows what
the library computes, not a re-derivation.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from drpo.objectives import policy_loss

METHODS: list[tuple[str, str, dict]] = [
    ("PPO clip 0.2", "ppo", {}),
    ("DPPO-TV 0.15", "dppo_tv", {}),
    ("SPO eps 12.5", "spo", {"epsilon": 12.5}),
    ("DRPO delta 0.15", "drpo", {"delta": 0.15}),
    ("DRPO delta 12.5", "drpo", {"delta": 12.5}),
]
MUS = (0.5, 0.01)


def gradient_weight(name: str, params: dict, pi: torch.Tensor, mu: float, A: float) -> torch.Tensor:
    """w(pi) = (dJ/dlog pi) / (A r) for one token at each value of ``pi`` (1-D)."""
    lp = pi.log().double().float()[None, :].clone().requires_grad_(True)
    blp = torch.full_like(lp, math.log(mu))
    loss, _ = policy_loss(name, lp, blp, torch.tensor([A]), torch.ones_like(lp), agg_mode="token-sum",
                          compute_metrics=False, **params)
    (g,) = torch.autograd.grad(loss, lp)
    r = torch.exp(lp.detach() - blp)
    return (-g / (A * r))[0]


def weight_table(shifts=(-0.3, -0.15, -0.05, 0.0, 0.05, 0.15, 0.3)) -> list[dict]:
    rows = []
    for mu in MUS:
        for A in (1.0, -1.0):
            for d in shifts:
                pi = mu + d
                if not 0 < pi < 1:
                    continue
                row = {"mu": mu, "A": A, "pi_minus_mu": d, "r": pi / mu}
                for label, name, p in METHODS:
                    row[label] = float(gradient_weight(name, p, torch.tensor([pi]), mu, A)[0])
                rows.append(row)
    return rows


def plot(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(MUS), 4, figsize=(18, 8), constrained_layout=True)
    for i, mu in enumerate(MUS):
        pi = torch.linspace(max(1e-4, mu * 0.02), min(0.9999, mu + 0.6), 600, dtype=torch.float64).float()
        for j, A in enumerate((1.0, -1.0)):
            for label, name, p in METHODS:
                w = gradient_weight(name, p, pi, mu, A)
                axes[i, j].plot((pi - mu).numpy(), w.numpy(), label=label, lw=1.6)
                axes[i, j + 2].plot((pi / mu).numpy(), w.numpy(), label=label, lw=1.6)
            for k, xl in ((j, "pi - mu"), (j + 2, "r = pi / mu")):
                ax = axes[i, k]
                ax.axhline(0, color="k", lw=0.6)
                ax.axhline(1, color="grey", lw=0.5, ls=":")
                ax.set_xlabel(xl)
                ax.set_ylabel("gradient weight w")
                ax.set_ylim(-1.5, 2.5)
                ax.set_title(f"mu = {mu}, A {'> 0' if A > 0 else '< 0'}")
            axes[i, j + 2].set_xscale("log")
            axes[i, j].axvline(0.15 * A, color="grey", lw=0.6, ls="--")
    axes[0, 0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Per-token gradient weight w = (dJ/dlog pi)/(A r); dashed: Binary-TV boundary "
                 "pi - mu = sign(A) 0.15.   Made by: drpo geometry", fontsize=11)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "geometry.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_geometry(out: Path) -> None:
    rows = weight_table()
    labels = [m[0] for m in METHODS]
    header = f"{'mu':>5} {'A':>3} {'pi-mu':>6} {'r':>6} " + " ".join(f"{l:>15}" for l in labels)
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['mu']:>5} {r['A']:>+3.0f} {r['pi_minus_mu']:>+6.2f} {r['r']:>6.2f} "
              + " ".join(f"{r[l]:>15.3f}" for l in labels))
    path = plot(out)
    (out / "geometry.json").write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {path} and {out / 'geometry.json'}")
