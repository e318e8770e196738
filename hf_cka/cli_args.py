"""The pieces of the ``hf-cka`` argument parser: constants, argument types and the option groups
that its commands share (:func:`add_loading`, :func:`add_data`, :func:`add_estimator`,
:func:`add_output`, :func:`add_layer_choice`, :func:`add_store_options`,
:func:`add_store_output`, :func:`add_private`). :func:`hf_cka.cli_parser.build_parser` assembles
them with the help texts of :mod:`hf_cka.cli_help`.

Nothing heavy is imported here: ``hf-cka --help`` must stay fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from typing import Any, Literal, NoReturn, get_args, get_origin, get_type_hints

import torch

from .data import MIN_BATCH
from .dtypes import DTYPES
from .layers import Part
from .options import DEFAULTS, RunOptions
from .tokens import clean_token

PROG = "hf-cka"
HEATMAP_FILE = "heatmap.png"
DRIFT_PLOT_FILE = "drift.png"
DPI = 150
MAX_DPI = 1200  # 300-600 is print quality; far more makes images no viewer or printer can use
SUMMARY_WIDTH = 86  # values beside labels of up to 12 characters fit in 100 columns
PARTS = get_args(Part)
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
RUN_OPTION_NAMES = frozenset(field.name for field in dataclasses.fields(RunOptions))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks; wider option column than the default."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are ONE line ``hf-cka: error: ...`` (status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


# --------------------------------------------------------------------------- argument types


def layer_list(text: str) -> str | list[str | int]:
    """``"auto"`` or comma-separated layer names and integer indices (``"0,-1"``)."""
    if text.strip() == "auto":
        return "auto"
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(
            "expected 'auto' or comma-separated layer names or indices, e.g. '0,-1'"
        )
    return [int(item) if re.fullmatch(r"[+-]?\d+", item) else item for item in items]


def _int(text: str) -> int:
    """An integer; its range is checked by :class:`~hf_cka.options.RunOptions`."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _max_length(text: str) -> int | None:
    """A token count, or ``none`` for the model's own limit."""
    return None if text.strip().lower() == "none" else _int(text)


def dpi_value(text: str) -> int:
    """A resolution between 1 and :data:`MAX_DPI` dots per inch."""
    value = _int(text)
    if not 1 <= value <= MAX_DPI:
        raise argparse.ArgumentTypeError(f"expected a resolution from 1 to {MAX_DPI}, got {value}")
    return value


def _device(text: str) -> str:
    """A device torch knows and this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps`` ...)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}; expected cpu, cuda, cuda:N, mps, xpu ..."
        ) from None
    if device.type == "cpu":
        return text
    backend = getattr(torch.backends, device.type, None) if device.type == "mps" else None
    module = backend or getattr(torch, device.type, None)
    available = getattr(module, "is_available", None)
    if not callable(available) or not available():
        raise argparse.ArgumentTypeError(
            f"{text}: this machine has no {device.type} device that torch can use; use cpu, or"
            " install a torch build for that device"
        )
    count = getattr(module, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        raise argparse.ArgumentTypeError(
            f"{text}: this machine has {count()} {device.type} device(s), numbered from 0"
        )
    return text


def colormap_name(name: str) -> str:
    """A matplotlib colour map name (matplotlib is imported only when plotting)."""
    from matplotlib import colormaps

    from .errors import suggest

    if name not in colormaps:
        raise argparse.ArgumentTypeError(
            f"unknown colour map {name!r}; expected a matplotlib colour map such as magma,"
            f" viridis or RdBu_r.{suggest(name, list(colormaps))}"
        )
    return name


def _device_map(text: str) -> str | dict[str, Any]:
    """``auto``/``balanced``/... or a JSON object mapping module names to devices."""
    if not text.lstrip().startswith("{"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not a valid JSON object ({err})") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object such as '{\"\": 0}'")
    return value


# --------------------------------------------------------------------------- parser


def add_run_option(group: argparse._ArgumentGroup, flag: str, help: str, **kwargs: Any) -> None:
    """The option for the :class:`RunOptions` field named like ``flag`` (``--batch-size`` ->
    ``batch_size``): the field's default, and for a ``Literal`` field its values as choices;
    ``kwargs`` go to ``add_argument`` (``type``, ``metavar`` ...)."""
    name = flag.removeprefix("--").replace("-", "_")
    hint = get_type_hints(RunOptions)[name]
    if get_origin(hint) is Literal:
        kwargs.setdefault("choices", get_args(hint))
    group.add_argument(flag, default=getattr(DEFAULTS, name), help=help, **kwargs)


def add_loading(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("loading")
    group.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        metavar="DTYPE",
        help="load the weights in this dtype: float32, bfloat16, float16, float64, auto (default:"
        " the checkpoint's own dtype); CKA is accumulated in float64 whatever it is",
    )
    group.add_argument(
        "--device", type=_device, help="device to run on, e.g. cpu, cuda, cuda:1, mps"
    )
    group.add_argument(
        "--device-map",
        type=_device_map,
        metavar="MAP",
        help="spread big models over devices with accelerate: 'auto', 'balanced' or a JSON map"
        " (exclusive with --device)",
    )
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow models that ship their own Python code to run it (review it first)",
    )
    group.add_argument(
        "--token",
        type=clean_token,
        help="Hub token for private or gated repos (default: your saved login or HF_TOKEN);"
        " never printed or saved",
    )


def add_data(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        metavar="ID_OR_PATH",
        help="Hub dataset id or local csv/tsv/json/jsonl/parquet/txt file or folder"
        " (default: the built-in probe corpus)",
    )
    group.add_argument("--dataset-config", metavar="NAME", help="Hub dataset configuration")
    group.add_argument("--split", help="dataset split (default: train, or the first one)")
    add_run_option(
        group,
        "--text-column",
        "column holding the texts (default: %(default)s); image columns are found automatically",
        metavar="NAME",
    )
    for side, other in (("a", "b"), ("b", "a")):
        group.add_argument(
            f"--column-{side}",
            metavar="NAME",
            help=f"paired data: the column model {side.upper()} reads (with --column-{other}),"
            " e.g. --column-a image --column-b caption; replaces --text-column",
        )
    add_run_option(
        group, "--num-samples", "use at most N samples (default: all)", type=_int, metavar="N"
    )
    add_run_option(
        group,
        "--batch-size",
        f"samples per CKA minibatch, at least {MIN_BATCH}; also the forward batch size"
        " (default: %(default)s)",
        type=_int,
        metavar="N",
    )
    add_run_option(
        group,
        "--max-length",
        "truncate texts to N tokens; 'none' for the model's limit (default: %(default)s)",
        type=_max_length,
        metavar="N",
    )
    group.add_argument(
        "--no-sort",
        dest="sort_by_length",
        action="store_false",
        help="do not sort texts by length before the forward passes (slower; the same result"
        " up to float rounding, see docs/distributed.md)",
    )
    add_run_option(
        group,
        "--chunk-batches",
        "CKA batches sorted by length together (default: %(default)s)",
        type=_int,
        metavar="N",
    )


def add_estimator(parser: argparse.ArgumentParser) -> None:
    """The ``estimator`` group (pooling, kernel, estimator, null, early stop) and the ``measure``
    group (another similarity measure than CKA)."""
    group = parser.add_argument_group("estimator")
    add_run_option(
        group,
        "--pooling",
        "how token activations become one vector per example; padding never counts (default:"
        " %(default)s). 'tokens' makes every token a sample (identical tokenizers only)",
    )
    add_run_option(group, "--kernel", "CKA kernel (default: %(default)s)")
    add_run_option(
        group,
        "--threshold",
        "RBF bandwidth factor: sigma = X times the median distance (default: %(default)s)",
        type=float,
        metavar="X",
    )
    add_run_option(
        group,
        "--estimator",
        "minibatch: Nguyen et al., with standard errors (default); linear / debiased: exact"
        " full-data linear CKA streamed with d_a x d_b memory per layer pair",
    )
    add_run_option(
        group,
        "--null-permutations",
        "also compute CKA with B's samples shuffled K times per batch: the chance level for"
        " this data size, saved as result.null (default: %(default)s, off)",
        type=_int,
        metavar="K",
    )
    add_run_option(group, "--seed", "seed of the permutations (default: %(default)s)", type=_int)
    group.add_argument(
        "--target-stderr",
        type=float,
        metavar="SE",
        help="stop early once every cell's standard error is below SE (default: use all data)",
    )
    group = parser.add_argument_group("measure")
    add_run_option(
        group,
        "--measure",
        "similarity measure (default: cka); the others hold the pooled features of every"
        " layer (bounded by --max-bytes) and give no standard errors",
    )
    group.add_argument(
        "--measure-param",
        dest="measure_params",
        action=_MeasureParam,
        default={},
        metavar="NAME=VALUE",
        help="a parameter of the measure, repeatable: k=10 (mutual_knn), keep=0.99 (svcca),"
        " distance=euclidean (rsa)",
    )
    add_run_option(
        group,
        "--max-bytes",
        "stop with an error when the pooled features of another measure, or the states of an"
        " exact estimator, would exceed N bytes (default: no limit)",
        type=_int,
        metavar="N",
    )


class _MeasureParam(argparse.Action):
    """Collects ``NAME=VALUE`` pairs into a dict; values read as int, float, else string."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        value: Any,
        option_string: str | None = None,
    ) -> None:
        name, sep, text = str(value).partition("=")
        if not sep or not name.strip():
            raise argparse.ArgumentError(self, f"expected NAME=VALUE such as k=10, got {value!r}")
        params = dict(getattr(namespace, self.dest) or {})
        params[name.strip()] = _scalar(text.strip())
        setattr(namespace, self.dest, params)


def _scalar(text: str) -> int | float | str:
    """``"10"`` -> 10, ``"0.99"`` -> 0.99, anything else stays a string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def add_output(parser: argparse.ArgumentParser, plot_file: str) -> None:
    """The output options of a run (``compare``, ``drift``), checkpoints included."""
    group = _add_publishing(
        parser,
        f"folder to write the result and {plot_file} to: new, empty or holding an earlier result;"
        " checked before any model is loaded (default: a new folder ./cka-results/<run id>/)",
        "also publish the result as a Hub dataset (created if missing; runs accumulate)",
    )
    group.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="save the running sums in DIR every --checkpoint-every batches and when"
        " interrupted; the same command run again resumes from them",
    )
    add_run_option(
        group,
        "--checkpoint-every",
        "batches between checkpoints (default: %(default)s)",
        type=_int,
        metavar="N",
    )


def add_store_output(parser: argparse.ArgumentParser, what: str) -> None:
    """The output options of a store (``fingerprint``, ``grid``): ``what`` is written."""
    _add_publishing(
        parser, f"folder to write {what} to", "also publish it as a Hub dataset (one commit)"
    )


def _add_publishing(
    parser: argparse.ArgumentParser, output_help: str, push_help: str
) -> argparse._ArgumentGroup:
    """The ``output`` group: ``--output``, ``--push-to-hub``, ``--private``, ``--no-progress``."""
    group = parser.add_argument_group("output")
    group.add_argument("--output", "-o", metavar="DIR", help=output_help)
    group.add_argument("--push-to-hub", metavar="REPO_ID", help=push_help)
    add_private(group)
    group.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="hide progress bars (for logs and CI)",
    )
    return group


def add_private(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--private", action="store_true", help="make a newly created Hub dataset private"
    )


def add_layer_choice(
    group: argparse._ArgumentGroup,
    suffix: str = "",
    *,
    layers_help: str = "layers: 'auto' (default) or comma-separated names/indices such as 0,-1",
    part_help: str = "stack (encoder, decoder) or tower (vision, text) to use (default: encoder)",
    defaults: bool = True,
) -> None:
    """``--layers`` and ``--part`` (``--layers-a`` and ``--part-a`` for ``suffix="-a"``);
    without ``defaults`` they are None when not given."""
    layers, part = ("auto", "encoder") if defaults else (None, None)
    group.add_argument(
        f"--layers{suffix}", type=layer_list, default=layers, metavar="LAYERS", help=layers_help
    )
    group.add_argument(f"--part{suffix}", choices=PARTS, default=part, help=part_help)


def add_store_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("store")
    group.add_argument(
        "--shuffle-seed",
        type=int,
        metavar="SEED",
        help="form the CKA batches after shuffling the samples with this seed (default: data"
        " order)",
    )
    group.add_argument(
        "--features",
        action="store_true",
        help="also store the pooled features (needed by --estimator linear/debiased)",
    )
