"""Reference NVFP4 and INT4 grids for the tests, written from the formulas (drpo.rollout.precision's
docstring), not from the library's scale functions; the nearest grid value is found by brute force:

    fp4   g = max|W| / (6 * 448),  s_ob = e4m3(max_{i in block b} |W_oi| / (6 g)),  16 weights a block;
          W_hat / (g s_ob) must be the E2M1 value nearest to W / (g s_ob) (clamped to +-6)
    int4  s_og = max_{i in group} |W_oi| / 7, 128 weights a group (the row if shorter);
          W_hat / s_og must be the integer round(W / s_og), in [-8, 7]

(tests/ is on sys.path under pytest: ``from quant_ref import ...``.)
"""
from __future__ import annotations

import torch

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
E2M1_SIGNED = torch.cat([-E2M1.flip(0)[:-1], E2M1])  # the 15 distinct values


def nearest_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Brute force: the E2M1 value nearest to each x (x off the midpoints)."""
    return E2M1_SIGNED[(x[..., None] - E2M1_SIGNED).abs().argmin(-1)]


def ref_nvfp4_scales(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g (..., 1, 1), per-weight full scale g * s_ob (..., out, in)), from the NVFP4 formulas."""
    g = w.abs().amax(dim=(-2, -1), keepdim=True) / (6 * 448)
    n_in = w.shape[-1]
    s = torch.empty_like(w)
    for start in range(0, n_in, 16):
        blk = w[..., start:start + 16]
        s[..., start:start + 16] = (blk.abs().amax(-1, keepdim=True) / (6 * g)).to(torch.float8_e4m3fn).float()
    return g, s


def ref_int4_scales(w: torch.Tensor) -> torch.Tensor:
    """Per-weight scale s_og (..., out, in), from the INT4 formula."""
    G = min(128, w.shape[-1])
    s = torch.empty_like(w)
    for start in range(0, w.shape[-1], G):
        s[..., start:start + G] = w[..., start:start + G].abs().amax(-1, keepdim=True) / 7
    return s


def assert_on_nvfp4_grid(w_hat: torch.Tensor, w: torch.Tensor, rtol: float = 1e-6) -> None:
    """w_hat is w's NVFP4 fake-quantisation: block scales on the e4m3 grid, codes the nearest E2M1
    (within ``rtol``: float32 rounding; 2^-8 for a w_hat held in bfloat16)."""
    g, s = ref_nvfp4_scales(w.float())
    assert torch.equal(s, s.to(torch.float8_e4m3fn).float()) and s.max() <= 448
    assert torch.equal(s.amax(dim=(-2, -1)), torch.full(s.shape[:-2], 448.0))  # each matrix's largest block
    code = w_hat.float() / (g * s)
    on_grid = nearest_e2m1(code)
    torch.testing.assert_close(code, on_grid, rtol=rtol, atol=1e-6)  # on the E2M1 grid
    x = (w.float() / (g * s)).clamp(-6, 6)
    gap = torch.where(x.abs() < 2, 0.5, torch.where(x.abs() < 4, 1.0, 2.0))
    assert ((x - on_grid).abs() <= gap / 2 + 1e-5).all()  # and the nearest grid value


def assert_on_int4_grid(w_hat: torch.Tensor, w: torch.Tensor, rtol: float = 1e-6) -> None:
    """w_hat is w's INT4 fake-quantisation: w_hat / s_og the integer nearest to w / s_og, in [-8, 7]
    (within ``rtol``: float32 rounding; 2^-8 for a w_hat held in bfloat16)."""
    s = ref_int4_scales(w.float())
    q = w_hat.float() / s
    torch.testing.assert_close(q, q.round(), rtol=rtol, atol=1e-5)  # integers
    assert q.round().min() >= -8 and q.round().max() <= 7
    assert torch.equal(q.round(), (w.float() / s).round())  # the nearest integer
