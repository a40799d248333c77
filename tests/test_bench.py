"""The benchmark's timing helper: tools take turns, and each keeps its fastest result."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from bench import interleaved  # noqa: E402


def test_tools_take_turns_and_keep_their_fastest_result() -> None:
    calls: list[str] = []
    times = {"a": iter([3.0, 1.0, 2.0]), "b": iter([0.5, 4.0, 0.7])}

    def tool(name: str):
        def run() -> SimpleNamespace:
            calls.append(name)
            return SimpleNamespace(seconds=next(times[name]), name=name)
        return run

    best = interleaved({"a": tool("a"), "b": tool("b")}, repeat=3)
    assert calls == ["a", "b"] * 3
    assert best["a"].seconds == 1.0 and best["b"].seconds == 0.5
