"""Every public kernel op against its oracle on every device, backend, dtype and shape of the
sweep (tests/sweep.py), and proof that the sweep's check catches a wrong kernel."""

from __future__ import annotations

import pytest
import sweep


@pytest.mark.parametrize("case", sweep.cases())
def test_sweep(case):
    sweep.check(case)
