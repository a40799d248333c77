"""AnalysisOptions: a setting the analysis would ignore is refused when it was given on purpose."""
from __future__ import annotations

import pytest

from curvscope.errors import CurvscopeError
from curvscope.settings import AnalysisOptions


@pytest.mark.parametrize("values, given, message", [
    ({"damping_int": (0.1,)}, ["damping_int"], "--damping-int does nothing without --order3"),
    ({"spectrum": False}, ["spectrum", "top_k"], "--top-k does nothing without --spectrum"),
    ({"kfac": "mc"}, ["kfac"], "--kfac does nothing without --curvature ggn or fisher"),
    ({"curvatures": ("ggn",)}, ["kfac_samples"], "--kfac-samples does nothing without --kfac mc"),
])
def test_an_ignored_setting_is_refused(values: dict, given: list[str], message: str) -> None:
    with pytest.raises(CurvscopeError, match=message):
        AnalysisOptions(**values).refuse_ignored(given)


@pytest.mark.parametrize("values, given", [
    ({"damping_int": (0.1,), "order3": True}, ["damping_int", "order3"]),
    ({"spectrum": False, "block_spectra": "off"}, ["spectrum", "block_spectra"]),  # "off" asks for nothing
    ({"kfac": "off"}, ["kfac"]),
    ({"curvatures": ("hessian", "fisher"), "kfac": "mc", "kfac_samples": 3}, ["curvatures", "kfac", "kfac_samples"]),
    ({"spectrum": False, "top_k": 3}, ["spectrum"]),  # not given: a default, or a value from the Python API
])
def test_a_used_setting_is_accepted(values: dict, given: list[str]) -> None:
    AnalysisOptions(**values).refuse_ignored(given)
