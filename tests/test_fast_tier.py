"""The fast tier's guard (conftest.py): a test that trains or starts a process without the slow mark fails."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]


@pytest.mark.slow
def test_an_unmarked_test_that_starts_a_process_or_trains_fails(pytester):
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    slow: end-to-end runs\n")
    pytester.makepyfile(test_inner="""
import subprocess
import pytest
from drpo.training.trainer import Trainer

def test_spawns():
    subprocess.run(["true"], check=True)

def test_trains():
    try:
        Trainer.step(None, 0)  # the guard sees the call before the (broken) step runs
    except AttributeError:
        pass

@pytest.mark.slow
def test_marked():
    subprocess.run(["true"], check=True)

def test_pure():
    assert 1 + 1 == 2
""")
    res = pytester.runpytest("-p", "no:cacheprovider")
    res.assert_outcomes(passed=4, errors=2)  # the two unmarked ones fail at teardown
    res.stdout.fnmatch_lines(["*test_spawns starts a process: mark it @pytest.mark.slow*",
                              "*test_trains trains (Trainer.step): mark it @pytest.mark.slow*"])
