"""`drpo geometry`: the figure is written and its table shows the paper's geometry."""
from __future__ import annotations

import pytest

from drpo.experiments.geometry import run_geometry, weight_table


def test_geometry_table_and_png(tmp_path, capsys):
    run_geometry(tmp_path)
    assert (tmp_path / "geometry.png").stat().st_size > 10_000
    assert "DRPO delta 12.5" in capsys.readouterr().out
    rows = {(r["mu"], r["A"], r["pi_minus_mu"]): r for r in weight_table()}
    # DRPO delta 0.15: zero at the Binary-TV boundary, negative beyond; DPPO masks beyond it
    assert rows[(0.5, 1.0, 0.15)]["DRPO delta 0.15"] == pytest.approx(0.0, abs=1e-5)
    assert rows[(0.5, 1.0, 0.3)]["DRPO delta 0.15"] == pytest.approx(-1.0, abs=1e-4)
    assert rows[(0.5, 1.0, 0.3)]["DPPO-TV 0.15"] == 0.0
    # the rare token: SPO (ratio penalty) turns corrective at |pi - mu| = 0.15 while DRPO 12.5 barely moves
    assert rows[(0.01, 1.0, 0.15)]["SPO eps 12.5"] < 0
    assert rows[(0.01, 1.0, 0.15)]["DRPO delta 12.5"] == pytest.approx(1 - 0.15 / 12.5, abs=1e-4)
