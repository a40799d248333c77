"""`curvscope analyse | render | info`: flags → API calls → files, with clean errors.

Bad input raises :class:`CurvscopeError`, shown as one paragraph on stderr
with exit code 2 (``--debug`` shows the traceback instead). An interrupt
(Ctrl-C or SIGTERM) exits with 130 and leaves every results file as it was.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import click

from curvscope import __version__
from curvscope.curvature.spectrum import DEFAULT_STEPS, DEFAULT_TOL, DEFAULT_TRACE_MATVECS
from curvscope.errors import CurvscopeError

if TYPE_CHECKING:
    from curvscope.results import EigenResult, SpectrumResult

SCALE_CHOICE = click.Choice(["linear", "symlog", "normalized"])
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _say_error(message: str) -> None:
    click.echo(textwrap.fill(f"curvscope: error: {message}", width=100), err=True)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class Command(click.Group):
    """A click group that turns CurvscopeError and interrupts into exit codes without tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = "--debug" in sys.argv[1:] or bool(os.environ.get("CURVSCOPE_DEBUG"))
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return super().invoke(ctx)
        except CurvscopeError as exc:
            if debug:
                traceback.print_exc()
            _say_error(str(exc))
            ctx.exit(EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            click.echo("\ncurvscope: interrupted; results files were left as they were.", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        finally:
            signal.signal(signal.SIGTERM, previous)


def _json_option(value: str | None, flag: str) -> dict | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise CurvscopeError(f"{flag} must be a JSON object, e.g. '{{\"in_channels\": 1}}': {exc}.") from None
    if not isinstance(parsed, dict):
        raise CurvscopeError(f"{flag} must be a JSON object, not {value!r}.")
    return parsed


def spectrum_summary(spec: "SpectrumResult") -> str:
    """One line: the extreme eigenvalues with their convergence, and the trace."""
    def ends(e: "EigenResult") -> str:
        flags = "" if e.converged.all() else f" ({int((~e.converged).sum())} not converged)"
        return ", ".join(f"{v:.4g}" for v in e.values) + flags

    return (f"top eigenvalues {ends(spec.top)}; bottom {ends(spec.bottom)}; trace {spec.trace.value:.4g} ± "
            f"{spec.trace.stderr:.2g}; {spec.products} Hessian-vector products ({spec.mode}) in {spec.elapsed_s:.1f} s")


def _data_kwargs(text: str | None, root: str | None) -> dict | None:
    kwargs = _json_option(text, "--data-kwargs")
    if root is not None:
        kwargs = {**(kwargs or {}), "root": root}
    return kwargs


def _default_output(labels: Sequence[str]) -> Path:
    prefix = os.path.commonprefix(list(labels)).rstrip("_-.") if len(labels) > 1 else labels[0]
    return Path("reports") / f"{prefix or 'results'}.h5"


@click.group(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="curvscope")
@click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
def main(debug: bool) -> None:
    """curvscope: the curvature of trained neural networks, layer by layer.

    The pseudo-Hessian H̄ (H̄_st = U_sᵀ H U_t, U_s the gradient restricted to
    parameter tensor s), its inverse and the per-layer learning rates, stored
    in HDF5 and drawn as the heatmaps of Wolinski (arXiv:2312.03885).
    """


@main.command()
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Results file [default: reports/<label>.h5].")
@click.option("--partition", type=click.Choice(["canonical", "layer", "trivial", "discrete"]),
              default="canonical", show_default=True, help="How parameters are grouped into S groups.")
@click.option("--samples", type=int, help="Analyse the first N samples of the split [default: all].")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds torch and every random probe (recorded in the file).")
@click.option("--random-subset", is_flag=True,
              help="Analyse a random subset of --samples samples drawn with --seed, instead of the first ones.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:i].")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
              help="Compute dtype (accumulation is always float64).")
@click.option("--strategy", type=click.Choice(["auto", "triangular", "batched"]), default="auto",
              show_default=True, help="How the Hessian-vector products of a batch are organised.")
@click.option("--model", help="Zoo model name or package.module:factory, for checkpoints that do not record one.")
@click.option("--trust-checkpoint", is_flag=True,
              help="Allow unpickling a whole nn.Module, which runs code from the file: only for files you trust.")
@click.option("--model-kwargs", help="JSON keyword arguments of --model.")
@click.option("--data", help="Data set (digits, synthetic, cifar10, mnist, npz, or package.module:function), "
                             "overriding the checkpoint's.")
@click.option("--data-root", help="Folder (cifar10, mnist) or file (npz) the data set is read from.")
@click.option("--data-kwargs", help="JSON keyword arguments of --data.")
@click.option("--loss", help="Loss (cross_entropy, nll, mse, or package.module:function returning a loss_fn), "
                             "overriding the checkpoint's.")
@click.option("--spectrum/--no-spectrum", default=True, show_default=True,
              help="Hessian eigenvalues (Lanczos), trace (Hutch++) and density (SLQ), whole model and per block.")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True,
              help="Eigenvalues at each end of the spectrum (top only for blocks).")
@click.option("--lanczos-steps", type=click.IntRange(min=1), default=DEFAULT_STEPS, show_default=True,
              help="Most Lanczos steps per run (runs stop earlier once residuals are small); also the SLQ steps.")
@click.option("--lanczos-tol", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TOL, show_default=True,
              help="An eigenvalue is converged when its residual is at most this times ‖H‖.")
@click.option("--slq-runs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Probe vectors of the SLQ density.")
@click.option("--trace-matvecs", type=click.IntRange(min=3), default=DEFAULT_TRACE_MATVECS, show_default=True,
              help="Hessian-vector products per Hutch++ trace.")
@click.option("--max-memory", default="2G", show_default=True,
              help="Keep the double-backward graphs for reuse when they fit this size; else recompute them.")
@click.option("--scale", "scales", type=SCALE_CHOICE, multiple=True, default=["linear"], show_default=True,
              help="Heatmap scale; repeat for several.")
@click.option("--figures", "figure_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Figure folder [default: beside the results file, named after it].")
@click.option("--no-render", is_flag=True, help="Store results only; draw no figures.")
@click.option("--shared-scale", is_flag=True, help="Share colour limits across checkpoints in the trajectory figure.")
@click.option("--overwrite", is_flag=True, help="Recompute checkpoints whose label the results file already holds.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display and no summary.")
def analyse(checkpoints: tuple[Path, ...], output: Path | None, partition: str, samples: int | None,
            batch_size: int, split: str, seed: int, random_subset: bool, device: str, dtype: str, strategy: str, model: str | None,
            trust_checkpoint: bool, model_kwargs: str | None, data: str | None, data_root: str | None,
            data_kwargs: str | None, loss: str | None,
            spectrum: bool, top_k: int, lanczos_steps: int, lanczos_tol: float, slq_runs: int,
            trace_matvecs: int, max_memory: str, scales: tuple[str, ...], figure_dir: Path | None, no_render: bool, shared_scale: bool, overwrite: bool,
            quiet: bool) -> None:
    """Compute H̄, H̄⁻¹ and the Newton step of each CHECKPOINT; store them and draw the heatmaps."""
    from curvscope.analysis import AnalysisOptions, analyse_checkpoint, default_label
    from curvscope.cli.progress import ProgressLine
    from curvscope.curvature.hvp import parse_memory
    from curvscope.figures.render import render
    from curvscope.store.hdf5 import check_writable, stored_labels, write_records

    labels = [default_label(p) for p in checkpoints]
    if len(set(labels)) != len(labels):
        raise CurvscopeError(f"several checkpoints share a file name ({', '.join(labels)}); their labels in "
                             f"the results file would clash: rename them or analyse them into separate files.")
    for path in checkpoints:
        if not path.is_file():
            raise CurvscopeError(f"checkpoint {str(path)!r} does not exist or is not a file.")
    output = output or _default_output(labels)
    check_writable(output)
    options = AnalysisOptions(samples=samples, batch_size=batch_size, partition=partition, split=split, seed=seed,
                              random_subset=random_subset,
                              device=device, dtype=dtype, strategy=strategy, model=model,
                              model_kwargs=_json_option(model_kwargs, "--model-kwargs"), data=data,
                              data_kwargs=_data_kwargs(data_kwargs, data_root), loss=loss,
                              trust_checkpoint=trust_checkpoint,
                              spectrum=spectrum, top_k=top_k, lanczos_steps=lanczos_steps, lanczos_tol=lanczos_tol,
                              slq_runs=slq_runs, trace_matvecs=trace_matvecs, max_memory=parse_memory(max_memory))
    done = set(stored_labels(output))
    for path, label in zip(checkpoints, labels):
        if label in done and not overwrite:
            if not quiet:
                click.echo(f"{label}: already in {output}; skipped (--overwrite recomputes it).")
            continue
        bar = ProgressLine(label, enabled=not quiet)
        try:
            record = analyse_checkpoint(path, options, label=label, progress=bar)
        finally:
            bar.close()
        write_records(output, [record])
        if not quiet:
            p, s = record.pseudo, record.step
            click.echo(f"{label}: loss {p.loss:.4f} over N={p.n_samples}, S={len(p.names)} groups, "
                       f"H̄ {'positive definite' if s.positive_definite else 'indefinite'}, "
                       f"condition number {s.condition_number:.3g} ({s.method}), predicted decrease "
                       f"{s.predicted_decrease:.4g}; {record.attrs['elapsed_s']:.1f} s -> {output}")
            if record.spectrum is not None:
                click.echo(f"{label}: {spectrum_summary(record.spectrum)}")
            if s.excluded.any():
                click.echo(f"{label}: zero gradient, excluded from the inverse: {', '.join(p.names[s.excluded])}")
        if record.attrs["determinism_warning"]:
            click.echo(f"curvscope: warning: {label}: {record.attrs['determinism_warning']}", err=True)
    if not no_render:
        written = render(output, figure_dir, scales, labels, shared_scale=shared_scale)
        if not quiet:
            click.echo(f"figures: {', '.join(str(p) for p in written)}")


@main.command(name="render")
@click.argument("results", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Figure folder [default: beside the results file, named after it].")
@click.option("--scale", "scales", type=SCALE_CHOICE, multiple=True, default=["linear"], show_default=True,
              help="Heatmap scale; repeat for several.")
@click.option("--label", "labels", multiple=True, help="Only these checkpoints (repeatable).")
@click.option("--density-width", type=click.FloatRange(min=0, min_open=True),
              help="Redraw the SLQ density with σ = this fraction of the spectrum's span [default: as stored].")
@click.option("--grey-insignificant", is_flag=True,
              help="Grey out off-diagonal entries of H̄ within 2 standard errors of zero (outlined heatmaps).")
@click.option("--shared-scale", is_flag=True, help="Share colour limits across checkpoints in the trajectory figure.")
def render_command(results: Path, out_dir: Path | None, scales: tuple[str, ...], labels: tuple[str, ...],
                   density_width: float | None, grey_insignificant: bool, shared_scale: bool) -> None:
    """Draw the figures of RESULTS (an HDF5 results file) from the stored data alone."""
    from curvscope.figures.render import render

    for path in render(results, out_dir, scales, labels or None, density_width, grey_insignificant, shared_scale):
        click.echo(str(path))


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--approximation", "approximations", type=click.Choice(["layer", "tensor"]), multiple=True,
              default=["layer"], show_default=True, help="Block structure to audit; repeat for both.")
@click.option("--of", "of", type=click.Choice(["hessian", "inverse", "both"]), default="both", show_default=True,
              help="Approximate H̄ block-diagonally, or H̄⁻¹, or audit both.")
@click.option("--tolerance", type=click.FloatRange(min=0, max=1), default=0.1, show_default=True,
              help="Valid when efficiency ≥ 1 − tolerance (or, if undefined, off-block ratio ≤ tolerance).")
@click.option("--json", "as_json", is_flag=True, help="Print every number as JSON (format curvscope-audit v1).")
@click.option("--samples", type=int, help="For checkpoint inputs: analyse the first N samples [default: all].")
@click.option("--batch-size", type=int, default=256, show_default=True, help="For checkpoint inputs.")
@click.option("--device", default="cpu", show_default=True, help="For checkpoint inputs.")
def audit(inputs: tuple[Path, ...], approximations: tuple[str, ...], of: str, tolerance: float, as_json: bool,
          samples: int | None, batch_size: int, device: str) -> None:
    """Is a block-diagonal curvature approximation valid? INPUTS: results files or checkpoints.

    Exit 0 when every audited approximation is valid, 1 when any is not, 2 on bad input.
    Checkpoints are analysed first (without spectra) into a temporary results file.
    """
    import tempfile

    import h5py

    from curvscope.analysis import AnalysisOptions, analyse_checkpoint, default_label
    from curvscope.audit import MATRICES, audit_checkpoint, audit_report, format_report
    from curvscope.store.hdf5 import read_results, write_records

    ofs = list(MATRICES) if of == "both" else [of]
    reports = []
    with tempfile.TemporaryDirectory(prefix="curvscope-audit-") as tmp:
        for path in inputs:
            if not path.is_file():
                raise CurvscopeError(f"{str(path)!r} does not exist or is not a file.")
            if h5py.is_hdf5(path):
                results = path
            else:
                results = Path(tmp) / f"{default_label(path)}.h5"
                write_records(results, [analyse_checkpoint(path, AnalysisOptions(
                    samples=samples, batch_size=batch_size, device=device, spectrum=False))])
            reports += [audit_checkpoint(ck, path, approximations, ofs, tolerance) for ck in read_results(results)]
    if not reports:
        raise CurvscopeError("the results files hold no checkpoints to audit.")
    report = audit_report(reports, tolerance)
    click.echo(json.dumps(report, indent=2, ensure_ascii=False) if as_json else format_report(report))
    sys.exit(0 if report["valid"] else 1)


@main.command()
@click.argument("results", type=click.Path(path_type=Path, dir_okay=False))
def info(results: Path) -> None:
    """Print what RESULTS (an HDF5 results file) holds."""
    from curvscope.store.hdf5 import describe

    click.echo(describe(results))


if __name__ == "__main__":
    main()
