"""What `curvscope analyse` computes and how: every setting declared once, with its range and help.

:class:`AnalysisOptions` is the Python API's description of an analysis. Each
field carries its own metadata (help text, range or choices), from which the
command line builds its option and by which the dataclass checks a value given
from Python, so the two cannot drift apart. Without torch: the command line
reads it to show its help.
"""
from __future__ import annotations

import math
from dataclasses import Field, dataclass, field, fields
from typing import Any, Iterable

from curvscope.curvature.defaults import (
    BATCHNORM_MODES,
    DEFAULT_MAX_MEMORY,
    DEFAULT_STEPS,
    DEFAULT_TOL,
    DEFAULT_TRACE_MATVECS,
    INT64_MAX,
)
from curvscope.curvature.kinds import DEFAULT_CURVATURE, KFAC_APPROXIMATIONS, KINDS
from curvscope.errors import CurvscopeError

PARTITIONS = ("canonical", "layer", "trivial", "discrete")


def setting(default: Any, help: str, type: str = "text", *, low: float = 0, high: float | None = None,
            open_low: bool = False, choices: tuple[str, ...] = (), flag: str | None = None,
            requires: tuple[str, tuple[Any, ...]] | None = None) -> Any:
    """A field of :class:`AnalysisOptions`, with what the command line and the checks need to know of it.

    `type`: "text", "count" (a whole number ≥ `low`), "number" (a finite number in [`low`, `high`], or
    (`low`, `high`] when `open_low`), "choice" (one of `choices`; a tuple default makes it repeatable),
    "json" (a mapping, given as JSON on the command line), "memory" (a count of bytes, given as 2G, 512M),
    "flag" (an on switch) or "toggle" (a --name/--no-name switch). `flag` overrides the option's name.
    `requires` = (field, values): the setting does something only when that field takes one of `values` (one of
    them among its values, for a repeatable field), unless its own value is "off", which asks for nothing; see
    :meth:`AnalysisOptions.refuse_ignored`.
    """
    meta = {"help": help, "type": type, "low": low, "high": high, "open_low": open_low, "choices": choices,
            "flag": flag, "requires": requires}
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


SPECTRUM = ("spectrum", (True,))
KFAC_CURVATURES = ("curvatures", ("ggn", "fisher"))


@dataclass(frozen=True)
class AnalysisOptions:
    """What to analyse and how; the command line fills it from its options (one per field)."""

    curvatures: tuple[str, ...] = setting(
        (DEFAULT_CURVATURE,), "Curvature to analyse (hessian: H, ggn: the generalised Gauss-Newton matrix G, fisher: "
        "the empirical Fisher F); repeat for several, each stored under its own label.", "choice",
        choices=tuple(KINDS), flag="--curvature")
    partition: str = setting("canonical", "How parameters are grouped into S groups.", "choice", choices=PARTITIONS)
    samples: int | None = setting(None, "Analyse the first N samples of the split [default: all].", "count", low=1)
    batch_size: int = setting(256, "Batch size of the exact batch-by-batch accumulation (results do not depend "
                                   "on it).", "count", low=1)
    split: str = setting("train", "Which split of the data set.", "choice", choices=("train", "test"))
    seed: int = setting(0, "Seeds torch and every random probe (recorded in the file).", "count")
    random_subset: bool = setting(False, "Analyse a random subset of --samples samples drawn with --seed, instead "
                                         "of the first ones.", "flag")
    device: str = setting("cpu", "cpu or cuda[:i].")
    threads: int | None = setting(None, "CPU threads torch computes with [default: torch's, one per core]. On a "
                                        "shared machine give the cores you have to yourself: threads that compete "
                                        "with other jobs for cores slow down many times over.", "count", low=1)
    dtype: str = setting("float32", "Compute dtype (accumulation is always float64).", "choice",
                         choices=("float32", "float64"))
    strategy: str = setting("auto", "How the Hessian's second derivatives of a batch are organised.",
                            "choice", choices=("auto", "triangular", "batched"))
    model: str | None = setting(None, "Zoo model name or package.module:factory, for checkpoints that do not "
                                      "record one.")
    model_kwargs: dict | None = setting(None, "JSON keyword arguments of --model.", "json")
    data: str | None = setting(None, "Data set (digits, synthetic, cifar10, mnist, npz, or package.module:function),"
                                     " overriding the checkpoint's.")
    data_kwargs: dict | None = setting(None, "JSON keyword arguments of --data.", "json")
    loss: str | None = setting(None, "Loss (cross_entropy, nll, mse, or package.module:function returning a "
                                     "loss_fn), overriding the checkpoint's.")
    trust_checkpoint: bool = setting(False, "Trust the checkpoint: allow unpickling a whole nn.Module or a .pt2's "
                                            "pickled members and plug-in names recorded in the file, all of which "
                                            "run code from it. Only for files you made.", "flag")
    output_key: str | None = setting(None, "Which entry of the model's output holds the predictions when the model "
                                           "returns a dict, a Hugging Face ModelOutput or a tuple: a key, or an index "
                                           "[default: 'logits' when present, else the first tensor].")
    batchnorm: str = setting("eval", "BatchNorm statistics: eval (the running ones) or batch (each batch's own; the "
                                     "running ones are left untouched).", "choice", choices=BATCHNORM_MODES)
    spectrum: bool = setting(True, "Eigenvalues (Lanczos), trace (Hutch++) and density (SLQ) of the curvature, "
                                   "whole model and per block.", "toggle")
    block_spectra: str = setting("layer", "Spectra of the diagonal blocks: layer (top eigenvalues of each layer; "
                                          "traces of every tensor and layer from the whole model's probes), tensor "
                                          "(top eigenvalues of each tensor as well), or off.", "choice",
                                 choices=("layer", "tensor", "off"), requires=SPECTRUM)
    top_k: int = setting(5, "Eigenvalues at each end of the spectrum (top only for blocks).", "count", low=1,
                         requires=SPECTRUM)
    lanczos_steps: int = setting(DEFAULT_STEPS, "Lanczos products each eigenvalue run may use at least (restarted "
                                                "runs go on to 20 x their basis until converged; they stop once "
                                                "residuals are small); the SLQ steps.", "count", low=1,
                                 requires=SPECTRUM)
    lanczos_tol: float = setting(DEFAULT_TOL, "An eigenvalue is converged when its residual is at most this times "
                                              "the operator's norm.", "number", high=1, open_low=True,
                                  requires=SPECTRUM)
    slq_runs: int = setting(1, "Probe vectors of the SLQ density.", "count", low=1, requires=SPECTRUM)
    trace_matvecs: int = setting(DEFAULT_TRACE_MATVECS, "Curvature-vector products per Hutch++ trace.", "count", low=3,
                                 requires=SPECTRUM)
    kfac: str = setting("auto", "K-FAC beside the GGN and Fisher records, under audit: auto (type-2 factors for ggn, "
                                "empirical ones for fisher), mc (labels sampled from the model's predictive "
                                "distribution, seeded by --seed), or off.", "choice", choices=("auto", "mc", "off"),
                    requires=KFAC_CURVATURES)
    kfac_samples: int = setting(1, "Label draws per sample for --kfac mc.", "count", low=1, requires=("kfac", ("mc",)))
    kfac_approximation: str = setting("expand", "How K-FAC treats the positions of weight-shared layers (sequence "
                                                "steps, pixels of a convolution): expand (each is a sample) or reduce "
                                                "(summed out first).", "choice", choices=KFAC_APPROXIMATIONS,
                                  requires=KFAC_CURVATURES)
    order3: bool = setting(False, "Hessian records: the order-3 diagonal D (H̄'s diagonal differentiated once "
                                  "more along each group's direction) and the paper's cubic-regularised learning "
                                  "rates, which join the interaction steps.", "flag")
    damping_int: tuple[float, ...] = setting((1.0,), "λ_int of the cubic-regularised learning rates (with --order3); "
                                                     "repeat for several [default: the paper's 1].", "number", low=0,
                                   requires=("order3", (True,)))
    max_memory: int = setting(DEFAULT_MAX_MEMORY, "Keep the graphs of the analysis set for reuse when they fit "
                                                  "this size (e.g. 512M, 2G), else recompute them; the spectra's "
                                                  "vectors must fit it too (the Lanczos basis shrinks to fit).",
                              "memory", low=1)

    def __post_init__(self) -> None:
        """Refuse, before any work, a value outside its field's range or choices."""
        for f in fields(self):
            check_setting(f, getattr(self, f.name))
        if self.spectrum and self.top_k > self.lanczos_steps:
            raise CurvscopeError(f"--top-k {self.top_k} asks for more eigenvalues than {self.lanczos_steps} Lanczos "
                                 f"steps can give: raise --lanczos-steps to at least {self.top_k} or lower --top-k.")
        if not self.curvatures or len(set(self.curvatures)) != len(self.curvatures):
            raise CurvscopeError(f"name each curvature once, not {', '.join(self.curvatures) or 'none'}.")


    def refuse_ignored(self, given: Iterable[str]) -> None:
        """Refuse the settings named in `given` (fields set on purpose, e.g. on the command line) that this
        analysis would ignore, such as --damping-int without --order3: a silently ignored option is a result
        the user did not get."""
        by_name = {f.name: f for f in fields(self)}
        for name in given:
            requires = by_name[name].metadata["requires"]
            if requires is None or getattr(self, name) == "off":  # turning off what is not done is harmless
                continue
            other, values = requires
            value = getattr(self, other)
            if not any(v in values for v in (value if isinstance(value, tuple) else (value,))):
                need = by_name[other]
                wanted = "" if need.metadata["type"] in ("flag", "toggle") else " " + " or ".join(map(str, values))
                raise CurvscopeError(f"{option_name(by_name[name])} does nothing without "
                                     f"{option_name(need)}{wanted}: add that, or leave it out.")


def _fits(meta: Any, value: Any) -> tuple[bool, str]:
    """Whether `value` fits a setting's metadata, and what is expected."""
    kind, low, high = meta["type"], meta["low"], meta["high"]
    whole = isinstance(value, int) and not isinstance(value, bool)
    if kind in ("count", "memory"):
        return whole and low <= value <= INT64_MAX, f"a whole number from {low} to {INT64_MAX}"
    if kind == "number":
        def fits(v: Any) -> bool:
            real = (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)
            return real and (v > low if meta["open_low"] else v >= low) and (high is None or v <= high)
        values = value if isinstance(value, tuple) else (value,)
        span = f"{'(' if meta['open_low'] else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
        return bool(values) and all(fits(v) for v in values), f"a number in {span}"
    if kind == "choice":
        values = value if isinstance(value, tuple) else (value,)
        return all(v in meta["choices"] for v in values), f"one of {', '.join(meta['choices'])}"
    if kind == "json":
        return isinstance(value, dict), "a mapping (a JSON object)"
    if kind in ("flag", "toggle"):
        return isinstance(value, bool), "true or false"
    return isinstance(value, str), "a string"


def check_setting(f: Field, value: Any) -> None:
    """Raise CurvscopeError when `value` does not fit the field `f` of :class:`AnalysisOptions` (None is
    accepted where the field's default is None: it means "not given")."""
    if value is None and f.default is None:
        return
    ok, expected = _fits(f.metadata, value)
    if not ok:
        raise CurvscopeError(f"{option_name(f)} must be {expected}, not {value!r}.")


def option_name(f: Field) -> str:
    """The command-line option of the field `f`, e.g. --batch-size."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")
