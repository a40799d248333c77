"""The hostile-input corpus (issue #13): every case exits cleanly, runs no code and damages nothing.

The corpus is generated from seeds and fixtures by the ``hostile_*`` modules: crafted checkpoints,
pickles and ``.pt2`` archives that try to create a marker file, bundles that name code, damaged
and tampered results files, misbehaving plug-ins and data files, and bad option values. Each
generator's cases run in one test that reports every failing case at once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from hostile import HostileCase, check
from hostile_exported import exported_cases
from hostile_inputs import GENERATORS
from hostile_store import store_cases

ALL: dict[str, Callable[[Path], list[HostileCase]]] = {**GENERATORS, "exported programs": exported_cases,
                                                        "results files": store_cases}
COUNTS: dict[str, int] = {}


@pytest.mark.parametrize("name", list(ALL))
def test_corpus(name: str, tmp_path: Path) -> None:
    cases = ALL[name](tmp_path)
    COUNTS[name] = len(cases)
    failures = []
    for case in cases:
        try:
            check(case)
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, f"{len(failures)} of {len(cases)} {name} cases failed:\n\n" + "\n\n".join(failures)


def test_corpus_size() -> None:
    """At least 150 hostile inputs in all (issue #13), counted from the generators themselves."""
    if len(COUNTS) < len(ALL):
        pytest.skip("runs after the corpus tests")
    total = sum(COUNTS.values())
    print(f"hostile corpus: {total} cases ({', '.join(f'{k}: {v}' for k, v in COUNTS.items())})")
    assert total >= 150, COUNTS
