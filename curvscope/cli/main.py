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
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Sequence

import click

from curvscope import __version__
from curvscope.cli.entry import exits_at_once
from curvscope.cli.options import FIELDS, analysis_options, given, options_from, user_gave
from curvscope.cli.types import FiniteFloat
from curvscope.curvature.kinds import curvature_kind
from curvscope.errors import CurvscopeError, summary
from curvscope.settings import option_name

if TYPE_CHECKING:
    from curvscope.analysis import AnalysisRecord
    from curvscope.results import EigenResult, SpectrumResult

SCALE_CHOICE = click.Choice(["linear", "symlog", "normalized", "layers"])  # figures.heatmaps.SCALES
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


EXIT_INTERNAL = 3
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a process its pipe's reader left


def launched_rank() -> tuple[int, int]:
    """(rank, number of processes) of a torchrun launch, read from its environment without importing torch;
    (0, 1) for a plain run. Only rank 0 prints, writes results files and draws figures."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _say_error(message: str) -> None:
    rank, size = launched_rank()
    where = f" (rank {rank} of {size})" if size > 1 else ""
    click.echo(textwrap.fill(f"curvscope: error{where}: {message}", width=100), err=True)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def interrupted() -> NoReturn:
    """Say that the run was interrupted and exit with 130 (results files are replaced only when complete)."""
    click.echo("\ncurvscope: interrupted; results files were left as they were.", err=True)
    sys.exit(EXIT_INTERRUPTED)


NO_ARGS: tuple[type[click.UsageError], ...] = tuple(
    getattr(click.exceptions, name) for name in ("NoArgsIsHelpError",) if hasattr(click.exceptions, name))


class Command(click.Group):
    """A click group whose every failure is one paragraph on stderr and an exit code, never a traceback.

    Bad input (:class:`CurvscopeError`, a bad option value) exits 2; an interrupt
    (Ctrl-C, SIGTERM) 130; a bug in curvscope 3, with a request to report it.
    ``--debug`` (or CURVSCOPE_DEBUG=1) shows the traceback as well.
    """

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> NoReturn:
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv or bool(os.environ.get("CURVSCOPE_DEBUG"))
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except CurvscopeError as exc:
            self._fail(str(exc), EXIT_BAD_INPUT, debug)
        except NO_ARGS as exc:  # `curvscope` alone (click >= 8.2): the help as it is, not folded into an error
            click.echo(exc.ctx.get_help() if exc.ctx else exc.format_message(), err=True)
            sys.exit(EXIT_BAD_INPUT)
        except click.ClickException as exc:  # a bad option or argument
            hint = f" (see '{exc.ctx.command_path} --help')" if isinstance(exc, click.UsageError) and exc.ctx else ""
            self._fail(exc.format_message().rstrip(".") + hint + ".", EXIT_BAD_INPUT, debug)
        except (KeyboardInterrupt, click.Abort):
            interrupted()
        except MemoryError:
            self._fail("the computation ran out of memory: analyse fewer samples (--samples), use smaller "
                       "batches (--batch-size) or keep fewer graphs (--max-memory).", EXIT_BAD_INPUT, debug)
        except Exception as exc:  # noqa: BLE001 - anything else is a bug, still reported in one paragraph
            self._fail(f"internal error ({summary(exc)}). This is a bug in curvscope: run again "
                       f"with --debug for the traceback and report it.", EXIT_INTERNAL, debug)
        finally:
            signal.signal(signal.SIGTERM, previous)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        """The command; when the reader of stdout has gone (``| head``, ``| true``), stop without a word and exit
        141, as a shell reports a process that SIGPIPE killed (click would exit 1, an audit's "not valid")."""
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # what is still buffered goes nowhere, without another error
            raise SystemExit(EXIT_CLOSED_PIPE) from None

    @staticmethod
    def _fail(message: str, code: int, debug: bool) -> NoReturn:
        if debug:
            traceback.print_exc()
        _say_error(message)
        sys.exit(code)


def spectrum_summary(spec: "SpectrumResult", short: str = "Hessian") -> str:
    """One line: the extreme eigenvalues with their convergence, and the trace."""
    def ends(e: "EigenResult") -> str:
        flags = "" if e.converged.all() else f" ({int((~e.converged).sum())} not converged)"
        return ", ".join(f"{v:.4g}" for v in e.values) + flags

    return (f"top eigenvalues {ends(spec.top)}; bottom {ends(spec.bottom)}; trace {spec.trace.value:.4g} ± "
            f"{spec.trace.stderr:.2g}; {spec.products} {short}-vector products ({spec.mode}) in {spec.elapsed_s:.1f} s")


def _data_kwargs(kwargs: dict | None, root: str | None) -> dict | None:
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
@analysis_options()
@click.option("--data-root", help="Folder (cifar10, mnist) or file (npz) the data set is read from.")
@click.option("--scale", "scales", type=SCALE_CHOICE, multiple=True, default=["linear"], show_default=True,
              help="Heatmap scale; repeat for several.")
@click.option("--figures", "figure_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Figure folder [default: beside the results file, named after it].")
@click.option("--no-render", is_flag=True, help="Store results only; draw no figures.")
@click.option("--shared-scale", is_flag=True, help="Share colour limits across checkpoints in the trajectory figure.")
@click.option("--overwrite", is_flag=True, help="Recompute checkpoints whose label the results file already holds.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display and no summary.")
def analyse(checkpoints: tuple[Path, ...], output: Path | None, data_root: str | None, scales: tuple[str, ...],
            figure_dir: Path | None, no_render: bool, shared_scale: bool, overwrite: bool, quiet: bool,
            **settings: Any) -> None:
    """Compute C̄ (H̄ by default), C̄⁻¹ and the Newton step of each CHECKPOINT; store them and draw the figures."""
    with exits_at_once():  # torch, h5py and matplotlib load here
        from curvscope.analysis import analyse_checkpoint, default_label
        from curvscope.cli.progress import ProgressLine
        from curvscope.curvature.kinds import record_label
        from curvscope.curvature.ranks import leave
        from curvscope.figures.render import render
        from curvscope.store.hdf5 import OPTIONAL_PARTS, check_label, check_writable, stored_parts, write_records
        from curvscope.store.reader import holds_hdf5

    leader = launched_rank()[0] == 0  # under torchrun every rank computes; rank 0 alone writes and prints
    quiet = quiet or not leader
    _refuse_unused_figure_options(no_render, len(checkpoints), shared_scale)
    stems = [default_label(p) for p in checkpoints]
    if len(set(stems)) != len(stems):
        raise CurvscopeError(f"several checkpoints share a file name ({', '.join(stems)}); their labels in "
                             f"the results file would clash: rename them or analyse them into separate files.")
    for path in checkpoints:
        if not path.is_file():
            raise CurvscopeError(f"checkpoint {str(path)!r} does not exist or is not a file.")
        if holds_hdf5(path):
            raise CurvscopeError(f"{str(path)!r} is an HDF5 file (a curvscope results file?), not a checkpoint: "
                                 f"'curvscope info', 'render' and 'audit' read results files.")
    output = output or _default_output(stems)
    check_writable(output)
    for stem in stems:
        for curvature in settings["curvatures"]:
            check_label(record_label(stem, curvature))
    options = options_from(settings, data_kwargs=_data_kwargs(settings["data_kwargs"], data_root))
    done = stored_parts(output)
    made = {"spectra": options.spectrum, "order-3 results": options.order3, "K-FAC": options.kfac != "off"}
    for stem in stems if overwrite and leader else []:
        for label in (record_label(stem, c) for c in options.curvatures):
            lost = sorted(part for part in done.get(label, ()) if not made[part])
            if lost:
                click.echo(f"curvscope: warning: --overwrite replaces {label}, whose stored {' and '.join(lost)} "
                           f"this run does not compute ({', '.join(OPTIONAL_PARTS[p][1] for p in lost)} would): "
                           f"they will be gone.", err=True)
    written: list[str] = []
    for path, stem in zip(checkpoints, stems):
        wanted = tuple(c for c in options.curvatures if overwrite or record_label(stem, c) not in done)
        for skipped in sorted(set(options.curvatures) - set(wanted)):
            if not quiet:
                click.echo(f"{record_label(stem, skipped)}: already in {output}; skipped (--overwrite recomputes it).")
        if not wanted:
            continue
        bar = ProgressLine(stem, enabled=not quiet)
        try:
            records = analyse_checkpoint(path, replace(options, curvatures=wanted), label=stem, progress=bar)
        finally:
            bar.close()
        if not leader:
            continue
        write_records(output, records, on_wait=lambda message: click.echo(f"curvscope: {message}", err=True))
        written += [r.label for r in records]
        for record in records:
            _summary(record, output, quiet)
    leave()
    if not no_render and leader:
        figures = render(output, figure_dir, scales, written or None, shared_scale=shared_scale) if written else []
        if not quiet and figures:
            click.echo(f"figures: {', '.join(str(p) for p in figures)}")


def _refuse_unused_figure_options(no_render: bool, checkpoints: int, shared_scale: bool) -> None:
    """Before any work: figure options that `analyse` would not use (with --no-render; --shared-scale for one
    checkpoint, which makes no trajectory figure)."""
    figure_options = [flag for name, flag in (("scales", "--scale"), ("figure_dir", "--figures"),
                                              ("shared_scale", "--shared-scale")) if user_gave(name)]
    if no_render and figure_options:
        one = len(figure_options) == 1
        raise CurvscopeError(f"{', '.join(figure_options)} set{'s' if one else ''} how figures are drawn, but "
                             f"--no-render draws none: leave {'it' if one else 'them'} out, or drop --no-render.")
    if shared_scale and checkpoints < 2:
        raise CurvscopeError("--shared-scale shares colour limits across the checkpoints of the trajectory figure, "
                             "which one checkpoint does not make: leave it out, or analyse several checkpoints.")


def _timings(record: "AnalysisRecord") -> str:
    """Where the time of one record went: the gradient pass (one, shared by the curvatures),
    C̄, K-FAC, the spectra, and the whole record."""
    a, bar = record.attrs, curvature_kind(record.attrs["curvature"]).bar
    parts = [f"gradient {a['gradient_s']:.1f} s"] if a["gradient_s"] else []
    parts.append(f"{bar} {a['pseudo_s']:.1f} s")
    if record.kfac is not None:
        parts.append(f"K-FAC {record.kfac.elapsed_s:.1f} s")
    if record.order3 is not None:
        parts.append(f"order-3 {record.order3.elapsed_s:.1f} s")
    if record.spectrum is not None:
        parts.append(f"spectra {record.spectrum.elapsed_s:.1f} s")
    return ", ".join(parts) + f"; {a['elapsed_s']:.1f} s in all"


def _summary(record: "AnalysisRecord", output: Path, quiet: bool) -> None:
    """What `analyse` prints of one stored record (warnings even when quiet)."""
    from curvscope.store.hdf5 import model_notes, record_warnings

    label, a = record.label, record.attrs
    if not quiet:
        p, s, bar = record.pseudo, record.step, curvature_kind(a["curvature"]).bar
        click.echo(f"{label}: loss {p.loss:.4f} over N={p.n_samples}, S={len(p.names)} groups, "
                   f"{bar} {'positive definite' if s.positive_definite else 'indefinite'}, "
                   f"condition number {s.condition_number:.3g} ({s.method}), predicted decrease "
                   f"{s.predicted_decrease:.4g}; {_timings(record)} -> {output}")
        if record.spectrum is not None:
            click.echo(f"{label}: {spectrum_summary(record.spectrum, curvature_kind(a['curvature']).short)}")
        if s.excluded.any():
            click.echo(f"{label}: zero gradient, excluded from the inverse: {', '.join(p.names[s.excluded])}")
        if a.get("collinear"):
            click.echo(f"{label}: {bar} is singular; collinear groups: {a['collinear']}")
        if record.kfac is not None:
            k, layer = record.kfac, record.interactions.step("hessian", "layer")
            exact = f"; kept exact (no K-FAC rule): {', '.join(k.exact)}" if k.exact else ""
            click.echo(f"{label}: K-FAC ({k.flavour}, {k.approximation}) step efficiency "
                       f"{k.measures.step.efficiency:.4g} (exact layer blocks {layer.efficiency:.4g}), "
                       f"deviation from {bar} {k.measures.deviation[0]:.3g}, in {k.elapsed_s:.1f} s{exact}")
        if a.get("kfac_note"):
            click.echo(f"{label}: {a['kfac_note']}")
        if record.order3 is not None:
            for st, asked, actual in zip(record.order3.steps, record.order3.requested, record.order3.actual_decrease):
                if asked:
                    click.echo(f"{label}: cubic step (λ_int={st.damping_int:g}): " + (
                        f"predicted decrease {st.predicted_decrease:.4g}, actual {actual:.4g}" if st.found
                        else f"none found: {st.reason}"))
        if a["attention"]:
            click.echo(f"{label}: {a['attention']}.")
        for note in model_notes(a):
            click.echo(f"{label}: {note}")
    for warning in record_warnings(a):
        click.echo(f"curvscope: warning: {label}: {warning}", err=True)


@main.command(name="render")
@click.argument("results", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Figure folder [default: beside the results file, named after it].")
@click.option("--scale", "scales", type=SCALE_CHOICE, multiple=True, default=["linear"], show_default=True,
              help="Heatmap scale; repeat for several.")
@click.option("--label", "labels", multiple=True, help="Only these checkpoints (repeatable).")
@click.option("--density-width", type=FiniteFloat(0, open_low=True),
              help="Redraw the SLQ density with σ = this fraction of the spectrum's span [default: as stored].")
@click.option("--grey-insignificant", is_flag=True,
              help="Grey out off-diagonal entries of H̄ within 2 standard errors of zero (outlined heatmaps).")
@click.option("--shared-scale", is_flag=True, help="Share colour limits across checkpoints in the trajectory figure.")
def render_command(results: Path, out_dir: Path | None, scales: tuple[str, ...], labels: tuple[str, ...],
                   density_width: float | None, grey_insignificant: bool, shared_scale: bool) -> None:
    """Draw the figures of RESULTS (an HDF5 results file) from the stored data alone."""
    with exits_at_once():
        from curvscope.figures.render import render

    for path in render(results, out_dir, scales, labels or None, density_width, grey_insignificant, shared_scale):
        click.echo(str(path))


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--approximation", "approximations", type=click.Choice(["layer", "tensor", "kfac"]), multiple=True,
              default=["layer"], show_default=True,
              help="Approximation to audit: layer or tensor blocks, or K-FAC (GGN and Fisher records); repeatable.")
@click.option("--of", "of", type=click.Choice(["matrix", "inverse", "both", "hessian"]), default="both",
              show_default=True, help="Approximate C̄ (H̄, Ḡ or F̄: 'matrix'; 'hessian' is its old name) "
                                      "block-diagonally, or C̄⁻¹, or audit both.")
@click.option("--tolerance", type=FiniteFloat(0, 1), default=0.1, show_default=True,
              help="Valid when efficiency ≥ 1 − tolerance (or, if undefined, off-block ratio ≤ tolerance).")
@click.option("--json", "as_json", is_flag=True, help="Print every number as JSON (format curvscope-audit, "
                                                       "version 2).")
@analysis_options("curvatures", "samples", "batch_size", "seed", "device", "threads", "kfac", "kfac_samples",
                  "kfac_approximation")
def audit(inputs: tuple[Path, ...], approximations: tuple[str, ...], of: str, tolerance: float, as_json: bool,
          **settings: Any) -> None:
    """Is a block-diagonal curvature approximation (or K-FAC) valid? INPUTS: results files or checkpoints.

    Exit 0 when every audited approximation is valid, 1 when any is not, 2 on bad input.
    Checkpoints are analysed first (without spectra, with --curvature, --samples, --batch-size, --seed,
    --device, --threads and the K-FAC options) into a temporary results file. K-FAC is audited as an approximation
    of C̄: its step applies K-FAC's own inverse, so its efficiency covers the inverse too.
    """
    if set(approximations) == {"kfac"} and of == "inverse":
        raise CurvscopeError("K-FAC is audited as an approximation of C̄ (its step efficiency already applies "
                             "K-FAC's inverse): drop --of inverse, or add --approximation layer or tensor for "
                             "block approximations of C̄⁻¹.")
    import tempfile

    with exits_at_once():
        from curvscope.audit import MATRICES, audit_checkpoint, audit_report, format_report
        from curvscope.store.hdf5 import read_results, write_records
        from curvscope.store.reader import holds_hdf5

    ofs = list(MATRICES) if of == "both" else ["matrix" if of == "hessian" else of]
    options = options_from(settings, spectrum=False)
    # a results file (maybe a damaged one) by its signature or its name; anything else is analysed first
    is_results = {path: path.is_file() and (holds_hdf5(path) or path.suffix in (".h5", ".hdf5")) for path in inputs}
    names = [option_name(FIELDS[n]) for n in given(settings)]
    if names and all(is_results.values()):
        raise CurvscopeError(f"{', '.join(names)} only appl{'ies' if len(names) == 1 else 'y'} to checkpoints, "
                             f"which audit analyses first; every input here is a results file, audited as it "
                             f"was stored: leave {'it' if len(names) == 1 else 'them'} out.")
    leader = launched_rank()[0] == 0  # under torchrun every rank analyses checkpoints; rank 0 alone audits
    analysed = False
    reports = []
    with tempfile.TemporaryDirectory(prefix="curvscope-audit-") as tmp:
        for path in inputs:
            if not path.is_file():
                raise CurvscopeError(f"{str(path)!r} does not exist or is not a file.")
            if is_results[path]:
                results = path
            else:
                with exits_at_once():
                    from curvscope.analysis import analyse_checkpoint, default_label

                results = Path(tmp) / f"{default_label(path)}.h5"
                records = analyse_checkpoint(path, options)
                analysed = True
                if not leader:
                    continue
                write_records(results, records)
            reports += [audit_checkpoint(ck, path, approximations, ofs, tolerance) for ck in read_results(results)]
    if analysed:
        from curvscope.curvature.ranks import leave

        leave()
    if not leader:
        return
    if not reports:
        raise CurvscopeError("the results files hold no checkpoints to audit.")
    if not any(c["approximations"] for c in reports):
        raise CurvscopeError("no checkpoint has a GGN or Fisher record, which K-FAC approximates: analyse with "
                             "--curvature ggn (or fisher) to audit K-FAC.")
    report = audit_report(reports, tolerance)
    click.echo(json.dumps(report, indent=2, ensure_ascii=False) if as_json else format_report(report))
    sys.exit(0 if report["valid"] else 1)


@main.command()
@click.argument("results", type=click.Path(path_type=Path, dir_okay=False))
def info(results: Path) -> None:
    """Print what RESULTS (an HDF5 results file) holds."""
    with exits_at_once():
        from curvscope.store.hdf5 import describe

    click.echo(describe(results))


if __name__ == "__main__":
    main()
