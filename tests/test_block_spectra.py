"""Block spectra whose cost does not grow with S: every block's trace from the whole model's Hutch++ products,
top eigenvalues per layer, per tensor or for no block (--block-spectra), and files of older writers."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import ROOT, dense, make_case, write_tiny_bundle
from torch import nn

from curvscope.cli.main import main
from curvscope.curvature import spectrum as spectrum_module
from curvscope.curvature.hessian import HessianOperator
from curvscope.curvature.hutchpp import hutchpp, hutchpp_parts
from curvscope.curvature.spectrum import eigen_blocks, spectrum
from curvscope.errors import CurvscopeError
from curvscope.figures import render as render_module
from curvscope.figures.spectra import blocks_figure
from curvscope.store.hdf5 import describe, read_results

CPU = torch.device("cpu")
OLD_RESULTS = ROOT / "tests" / "fixtures" / "lenet5_digits_ep21_older_writer.h5"  # the shipped report as written before
# block traces were shared (every block with top/, layer traces "sum of tensor blocks"), kept as a fixture


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_block_traces_from_shared_products_match_dense_blocks() -> None:
    """Each tensor's and layer's trace, from the whole model's 30 products, within 4 stated standard errors of
    tr(H_BB); the tensor traces add up to the whole model's estimate, which is Hutch++'s as before."""
    case = make_case("cnn")
    batches = case.batches([5, 7])
    h = dense(case, batches).hessian.numpy()
    with HessianOperator.create(case.model, case.loss_fn, batches) as hp:
        whole, groups = hp.operator(None), hp.groups()
        sizes = [p.numel() for p in hp.params]
        starts = np.cumsum([0, *sizes])
        for seed in range(3):
            res = hutchpp_parts(whole.matvec, whole.dim, 30, sizes, generator=torch.Generator().manual_seed(seed),
                                device=CPU)
            alone = hutchpp(whole.matvec, whole.dim, 30, generator=torch.Generator().manual_seed(seed), device=CPU)
            assert (res.value, res.stderr, res.exact) == alone and res.products == 30
            assert sum(res.block([i])[0] for i in range(len(sizes))) == pytest.approx(res.value, rel=1e-12)
            for name, idx in groups.items():
                exact = sum(np.trace(h[starts[i]:starts[i + 1], starts[i]:starts[i + 1]]) for i in idx)
                value, stderr = res.block(idx)
                assert stderr > 0 and abs(value - exact) <= 4 * stderr, (seed, name, value, exact, stderr)


def test_small_operators_are_traced_exactly_with_every_block() -> None:
    """n <= matvecs: n products with unit vectors give the whole trace and every block's, exactly."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(12, 12))
    c = torch.as_tensor(a + a.T)
    res = hutchpp_parts(lambda v, out=None: c @ v, 12, 30, [5, 4, 3], generator=torch.Generator(), device=CPU)
    assert res.exact and res.products == 12 and res.stderr == 0
    assert res.block([1]) == (pytest.approx(float(torch.trace(c[5:9, 5:9])), rel=1e-12), 0.0)
    assert res.block([0, 2])[0] == pytest.approx(float(torch.trace(c[:5, :5]) + torch.trace(c[9:, 9:])), rel=1e-12)
    with pytest.raises(ValueError, match="parts hold 11"):
        hutchpp_parts(lambda v, out=None: c @ v, 12, 30, [5, 6], generator=torch.Generator(), device=CPU)


def test_block_standard_errors_are_right_on_average() -> None:
    """Over 400 seeds, the mean squared error of each block's trace equals its mean squared standard error (the
    sample variance of the Hutchinson terms is unbiased given the deflation), and |z| > 4 stays rare."""
    rng = np.random.default_rng(1)
    n, sizes = 150, [40, 5, 60, 45]
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    lam = np.concatenate([[40.0, 25.0, 12.0, -6.0], rng.normal(size=n - 4)])  # outliers, and an indefinite bulk
    c = torch.as_tensor((q * lam) @ q.T + np.diag(rng.uniform(0, 3, n)))
    starts = np.cumsum([0, *sizes])
    blocks = [[0], [1], [2], [3], [0, 1], [2, 3]]
    exact = np.array([sum(float(torch.trace(c[starts[i]:starts[i + 1], starts[i]:starts[i + 1]])) for i in b)
                      for b in blocks])
    err, se = [], []
    for seed in range(400):
        res = hutchpp_parts(lambda v, out=None: c @ v, n, 30, sizes, generator=torch.Generator().manual_seed(seed),
                            device=CPU)
        est = np.array([res.block(b) for b in blocks])
        err.append(est[:, 0] - exact)
        se.append(est[:, 1])
    err, se = np.array(err), np.array(se)
    ratio = np.mean(err ** 2, 0) / np.mean(se ** 2, 0)
    assert np.all((ratio > 0.75) & (ratio < 1.33)), ratio
    assert np.mean(np.abs(err / se) > 4) < 0.01


def _chain(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double()


@pytest.mark.parametrize("blocks", ["off", "layer"])
def test_trace_products_do_not_grow_with_the_number_of_groups(monkeypatch: pytest.MonkeyPatch, blocks: str) -> None:
    """An MLP of S = 4 tensors and one of S = 16 with about as many parameters (325, 353): the same 12 whole-model
    products trace every block of both, and no block product is made but those of the blocks' Lanczos runs."""
    traced: list[int] = []
    real = spectrum_module.hutchpp_parts

    def counting(matvec, *args, **kwargs):
        res = real(matvec, *args, **kwargs)
        traced.append(res.products)
        return res

    monkeypatch.setattr(spectrum_module, "hutchpp_parts", counting)
    for widths in ([10, 20, 5], [10, 6, 6, 6, 6, 6, 6, 6, 5]):
        torch.manual_seed(0)
        model = _chain(widths)
        x, y = torch.randn(16, 10, dtype=torch.float64), torch.randint(0, 5, (16,))
        with HessianOperator.create(model, nn.functional.cross_entropy, [(x, y)]) as hp:
            S, block_products = len(hp.names), [0]
            whole_product = hp.block_product

            def product(indices, v, out=None):
                block_products[0] += len(indices) < S
                return whole_product(indices, v, out)

            monkeypatch.setattr(hp, "block_product", product)
            res = spectrum(hp, k=1, tol=1e-3, max_steps=6, slq_steps=4, trace_matvecs=12, blocks=blocks)
        assert len(res.blocks) == S + S // 2 and all(b.trace.matvecs == 12 for b in res.blocks)
        assert all(b.trace.method == "hutch++ (shared products)" for b in res.blocks)
        with_top = [b for b in res.blocks if b.top is not None]
        assert [b.group for b in with_top] == ([] if blocks == "off" else [str(i) for i in range(0, S, 2)])
        assert block_products[0] == sum(b.top.steps for b in with_top)  # 0 with the eigenvalues off
    assert traced == [12, 12]


def test_which_blocks_get_eigenvalues() -> None:
    """layer: each module's tensors together, and a tensor that is alone in its module (a Linear without bias)."""
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 2)).double()
    with HessianOperator.create(model, nn.functional.cross_entropy,
                                [(torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0]))]) as hp:
        assert eigen_blocks(hp, "layer") == ["0.weight", "2"]
        assert eigen_blocks(hp, "tensor") == ["0.weight", "2.weight", "2.bias", "2"]
        assert eigen_blocks(hp, "off") == []
        with pytest.raises(CurvscopeError, match="block spectra must be one of layer, tensor, off"):
            eigen_blocks(hp, "all")


@pytest.mark.parametrize("blocks, with_top", [("off", []), ("layer", ["net.1", "net.3"]),
                                              ("tensor", ["net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias",
                                                          "net.1", "net.3"])])
def test_block_spectra_setting_end_to_end(tmp_path: Path, blocks: str, with_top: list[str]) -> None:
    ck = write_tiny_bundle(tmp_path / "tiny_ep03.pt")
    out = tmp_path / "r.h5"
    res = run("analyse", ck, "-o", out, "--no-render", "--block-spectra", blocks, "--lanczos-steps", "20",
              "--top-k", "2")
    assert res.exit_code == 0, res.output
    with h5py.File(out) as fh:
        grp = fh["checkpoints/tiny_ep03/spectrum/blocks"]
        order = list(grp.attrs["order"].astype(str))
        assert order == ["net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias", "net.1", "net.3"]
        assert [g for g in order if "top" in grp[g]] == with_top
        assert {grp[g]["trace"].attrs["method"] for g in order} == {"hutch++ (shared products)"}
        assert all(grp[g]["trace"].attrs["matvecs"] == 30 for g in order)
        traces = {g: float(grp[g]["trace"][()]) for g in order}
        whole = float(fh["checkpoints/tiny_ep03/spectrum/trace"][()])
    assert sum(traces[g] for g in order[:4]) == pytest.approx(whole, rel=1e-10)
    assert traces["net.1"] == pytest.approx(traces["net.1.weight"] + traces["net.1.bias"], rel=1e-10)
    info = run("info", out)
    assert info.exit_code == 0
    summary = f"diagonal blocks: traces of 6 (hutch++ (shared products)), top eigenvalues of {len(with_top)}"
    assert summary in info.output
    (ck_read,) = read_results(out)
    fig = blocks_figure(ck_read)  # traces of every block; eigenvalues where stored, and only those panels
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    layers = [g for g in with_top if g in ("net.1", "net.3")]
    tops = {"layer": 2 * len(layers), "tensor": 2 * (len(with_top) - len(layers))}
    assert {t for t in axes if t.startswith("top")} == {f"top eigenvalues of each {k} block" for k, n in tops.items()
                                                        if n}
    for kind, n in tops.items():
        if n:
            assert sum(len(c.get_offsets()) for c in axes[f"top eigenvalues of each {kind} block"].collections) == n
    assert [_points(axes[f"trace of each {k} block (± 1 s.e.)"]) for k in ("layer", "tensor")] == [2, 4]


def _points(ax) -> int:
    """The traces a panel draws: points (with error bars), one per block."""
    return sum(len(line.get_xdata()) for line in ax.lines if line.get_marker() == "o")


def test_info_and_render_read_files_of_the_older_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file of the previous writer (every block with top/, layer traces "sum of tensor blocks") reads, is described
    block by block and renders (every figure is built, only the blocks figure drawn, small and in memory, and none
    written: saving them takes most of a render's time)."""
    drawn = []

    def draw(fig, base, what):
        if base.name.endswith("spectrum-blocks"):
            fig.savefig(io.BytesIO(), format="png", dpi=30)
            drawn.append(base.name)
        return []

    monkeypatch.setattr(render_module, "save_figure", draw)
    old = tmp_path / "old.h5"
    shutil.copy(OLD_RESULTS, old)
    with h5py.File(old) as fh:
        blocks = fh["checkpoints/lenet5_digits_ep21/spectrum/blocks"]
        assert all("top" in blocks[g] for g in blocks)
        assert blocks["conv1/trace"].attrs["method"] == "sum of tensor blocks"
    info = run("info", old)
    assert info.exit_code == 0
    assert "top eigenvalues of 15" in info.output and "sum of tensor blocks" in info.output
    ck = read_results(old)[0]
    assert ck.label == "lenet5_digits_ep21"
    fig = blocks_figure(ck)
    assert [sum(len(c.get_offsets()) for c in ax.collections) for ax in fig.axes[:2]] == [5 * 5, 10 * 5]
    res = run("render", old, "--out-dir", tmp_path / "fig")
    assert res.exit_code == 0, res.output
    assert drawn == ["lenet5_digits_ep21-spectrum-blocks"]  # its GGN record has no spectrum


def test_render_draws_traces_of_blocks_without_eigenvalues(tmp_path: Path) -> None:
    """A file whose tensor blocks have no top/ (the default, --block-spectra layer) renders its blocks figure."""
    old = tmp_path / "r.h5"
    shutil.copy(OLD_RESULTS, old)
    with h5py.File(old, "r+") as fh:
        blocks = fh["checkpoints/lenet5_digits_ep21/spectrum/blocks"]
        for g in list(blocks):
            if blocks[g].attrs["kind"] == "tensor":
                del blocks[g]["top"]
    ck = read_results(old)[0]
    fig = blocks_figure(ck)
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert list(axes) == ["top eigenvalues of each layer block", "trace of each layer block (± 1 s.e.)",
                          "trace of each tensor block (± 1 s.e.)"]
    assert sum(len(c.get_offsets()) for c in axes["top eigenvalues of each layer block"].collections) == 5 * 5
    assert "not computed" in fig.get_suptitle() and _points(axes["trace of each tensor block (± 1 s.e.)"]) == 10
    text = describe(old)
    assert "top eigenvalues of 5" in text and "conv1.weight" in text
