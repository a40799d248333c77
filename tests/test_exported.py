"""torch.export programs (.pt2) load without running code from the file (issue #13)."""
from __future__ import annotations

import contextlib
import copy
import json
import random
import warnings
from fractions import Fraction
from pathlib import Path

import pytest
import sympy
import torch
import torch.utils._sympy.functions as F
from conftest import TINY_DATA
from hostile_exported import (
    LOADS_SAFELY,
    PLAIN_TORCH_RUNS,
    REFUSALS,
    UNTRUSTABLE,
    code_archives,
    damaged_archives,
    export_tiny,
    read_members,
    rewrite,
    torch_saved,
)

from curvscope.errors import CurvscopeError
from curvscope.sources import exported
from curvscope.sources.checkpoint import load_checkpoint
from curvscope.sources.exported import Exported, load_exported_program

MARKER = "PWNED"
CRAFTED = ["sample inputs exec", "sample inputs os.system", "weight use_pickle", "constant use_pickle", "opaque object",
           "custom object", "legacy weights member", "legacy constants member", "aotinductor library",
           "sympy expression", "parameter name", "forward_arg_names", "kwarg name in in_spec", "guards_code",
           "torch 2.7 layout"]


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], Path]:
    tmp = tmp_path_factory.mktemp("crafted")
    return code_archives(tmp, tmp / MARKER), tmp / MARKER


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return damaged_archives(tmp_path_factory.mktemp("damaged"))


@pytest.fixture(scope="module")
def legit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("legit") / "tiny.pt2")


def _plain_torch(path: Path, how: str) -> None:
    """What a user of torch.export.load does: load the program and, for `how == "call"`, run its module."""
    with warnings.catch_warnings(), contextlib.suppress(Exception):  # crafted programs often break after their code ran
        warnings.simplefilter("ignore")
        program = torch.export.load(path)
        if how == "call":
            program.module()(torch.randn(3, 12))


@pytest.mark.parametrize("trust", [False, True])
def test_legit_program_loads_with_a_dynamic_batch(legit: Path, trust: bool) -> None:
    net = load_exported_program(legit, trust=trust)
    plain = torch.export.load(legit).module()
    assert isinstance(net, Exported) and net.train() is net and net.training
    clone = copy.deepcopy(net)  # as the analysis does; torch's pytree specs warn when copied
    for batch in (1, 5, 9):
        x = torch.randn(batch, 12)
        torch.testing.assert_close(net(x), plain(x))
        torch.testing.assert_close(clone(x), plain(x))
    ck = load_checkpoint(legit, loss="nll", data=TINY_DATA, trust=trust)
    assert isinstance(ck.model, Exported) and ck.loss == "nll" and ck.data == TINY_DATA


@pytest.mark.parametrize("name", sorted(PLAIN_TORCH_RUNS))
def test_plain_torch_runs_the_crafted_code(crafted: tuple[dict[str, Path], Path], name: str) -> None:
    """The crafted archives are real attacks: torch.export.load (or the module it returns) runs their code."""
    paths, marker = crafted
    marker.unlink(missing_ok=True)
    _plain_torch(paths[name], PLAIN_TORCH_RUNS[name])
    assert marker.exists(), f"{name}: the crafted archive no longer runs code in plain torch"
    marker.unlink()


@pytest.mark.parametrize("name", CRAFTED)
def test_crafted_archives_run_no_code(crafted: tuple[dict[str, Path], Path], name: str) -> None:
    paths, marker = crafted
    marker.unlink(missing_ok=True)
    if name in LOADS_SAFELY:
        load_exported_program(paths[name])(torch.randn(3, 12))
    else:
        with pytest.raises(CurvscopeError) as err:
            load_checkpoint(paths[name], loss="nll")
        message = str(err.value)
        assert REFUSALS.get(name, "can only be loaded by running code") in message
        assert ("--trust-checkpoint" in message) is (name not in UNTRUSTABLE) and "\n" not in message
        assert not any(bad in message.lower() for bad in ("weights_only", "re-running", "allow_pickle"))
    assert not marker.exists(), f"{name}: code from the archive ran"


def test_every_crafted_archive_is_tested(crafted: tuple[dict[str, Path], Path]) -> None:
    assert sorted(CRAFTED) == sorted(crafted[0])


def test_restricted_pickles_load_and_others_need_trust(legit: Path, tmp_path: Path) -> None:
    """A pickled weight of plain tensors loads untrusted; a pickle asking for other globals needs trust."""
    _, members = read_members(legit)
    config = json.loads(members["data/weights/model_weights_config.json"])
    config["config"]["net.1.weight"]["use_pickle"] = True
    weight = torch.nn.Parameter(torch.randn(6, 12))
    pickled_weight = rewrite(legit, tmp_path / "pickled-weight.pt2", {
        "data/weights/model_weights_config.json": json.dumps(config), "data/weights/weight_0": torch_saved(weight)})
    net = load_exported_program(pickled_weight)
    torch.testing.assert_close(net.exported.get_parameter("net.1.weight"), weight)
    fraction = rewrite(legit, tmp_path / "fraction.pt2", {
        "data/sample_inputs/model.pt": torch_saved(((torch.randn(4, 12), Fraction(1, 3)), {}))})
    with pytest.raises(CurvscopeError, match=r"fractions\.Fraction.*--trust-checkpoint"):
        load_checkpoint(fraction)
    assert isinstance(load_checkpoint(fraction, trust=True, loss="nll").model, Exported)


@pytest.mark.parametrize("trust", [False, True])
def test_damaged_archives_raise_curvscope_error(damaged: dict[str, Path], trust: bool) -> None:
    for name, path in damaged.items():
        with pytest.raises(CurvscopeError, match="not a readable torch.export program|empty") as err:
            load_exported_program(path, trust=trust)
        assert "\n" not in str(err.value), name


def test_fuzzed_archives_load_or_raise_curvscope_error(legit: Path, tmp_path: Path) -> None:
    """Truncated anywhere, or with bits flipped anywhere (headers included): loads, or a CurvscopeError."""
    raw = legit.read_bytes()
    rng = random.Random(2024)
    variants = [raw[:cut] for cut in rng.sample(range(len(raw)), 40)]
    for seed in range(60):
        flip, data = random.Random(seed), bytearray(raw)
        for _ in range(1 + seed % 5):
            data[flip.randrange(len(data))] ^= 1 << flip.randrange(8)
        variants.append(bytes(data))
    path = tmp_path / "fuzzed.pt2"
    for data in variants:
        path.write_bytes(data)
        try:
            load_exported_program(path)(torch.randn(2, 12))
        except CurvscopeError:
            pass


def test_torch_is_restored_after_every_load(crafted: tuple[dict[str, Path], Path], legit: Path) -> None:
    from torch.export.pt2_archive import _package

    before = (torch.load, torch._C._pickle_load_obj, _package.pickle, _package._load_aoti)
    for path in [*crafted[0].values(), legit]:
        try:
            load_exported_program(path)
        except CurvscopeError:
            pass
    assert (torch.load, torch._C._pickle_load_obj, _package.pickle, _package._load_aoti) == before
    crafted[1].unlink(missing_ok=True)


def test_shape_expressions() -> None:
    """sympy's srepr of size expressions passes; anything that is code, or costly to evaluate, does not."""
    s, u = sympy.Symbol("s77", integer=True, positive=True), sympy.Symbol("u0", integer=True)
    fine = [s, 2 * s + 1, s ** 2, 1 / s, F.FloorDiv(s, 2), F.ModularIndexing(s, 1, 4), sympy.Max(1, s),
            sympy.Eq(s, 2), sympy.Ne(s, u), sympy.Lt(s, 5), sympy.And(sympy.Ge(s, 2), sympy.Le(u, 3)),
            sympy.Piecewise((s, sympy.Eq(u, 1)), (u, True)), sympy.oo, -sympy.oo, sympy.Float(1.5),
            sympy.Rational(3, 7) * s, sympy.sqrt(s), F.CleanDiv(s, 2), F.PythonMod(s, 3), sympy.true]
    for expr in fine:
        assert exported._unsafe_expression(sympy.srepr(expr)) is None, sympy.srepr(expr)
    hostile = ["exec('import os')", "__import__('os').system('true')", "Symbol('x').__class__",
               "(lambda: 0)()", "Integer(2)**Integer(10)", "Pow(Integer(10), Integer(1000000000))",
               "LShift(Integer(1), Integer(10000000000))", "Float('1.5', precision=1000000000)",
               "factorial(Integer(100000000))", "Integer(" + "9" * 40 + ")", "Symbol('x', evaluate=True)",
               "Pow(Pow(Pow(Symbol('x'), Integer(2)), Integer(2)), Integer(2))", "[Integer(1)]",
               "Symbol('a' * 10)", "Add(" * 300 + ")" * 300, "S.Infinity", "x" * 30_000]
    for text in hostile:
        assert exported._unsafe_expression(text) is not None, text
