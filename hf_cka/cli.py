"""The ``hf-cka`` command line (also ``python -m hf_cka``).

Subcommands:

- ``compare A [B]``: CKA between the layers of two models; writes a result folder and a heatmap.
- ``drift BASE CKPT [CKPT ...]``: same-layer CKA of a base model with several checkpoints.
- ``plot RESULT_DIR``: re-plots a saved result.
- ``push RESULT_DIR REPO_ID``: publishes a saved result as a Hub dataset.

Under ``accelerate launch -m hf_cka compare ...`` every process runs this CLI and computes its
shard of the batches; only the main process prints, writes files and pushes. Errors print one
line ``hf-cka: error: <message>`` and exit with status 2 (``--debug`` adds the traceback); an
interrupt exits with 130. The Hub token is never printed or written.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import re
import sys
import tempfile
import textwrap
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, get_args

import torch

from . import __version__, distributed
from .data import MIN_BATCH
from .errors import HfCkaError, InvalidInputError
from .functional import Kernel
from .layers import Part
from .options import DEFAULTS, RunOptions
from .pooling import Pooling
from .provenance import ModelProvenance, Provenance
from .streaming import Estimator
from .tokens import clean_token, scrub

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

DESCRIPTION = """\
Centered Kernel Alignment (CKA) between the layers of Hugging Face models.

Models are Hub ids, local folders, or "repo@revision". Without --dataset the built-in probe
corpus (a few hundred varied English sentences) is used. Results are saved as folders (result.json +
tensors.safetensors + a PNG) that `hf-cka plot` and `hf-cka push` read back."""

MAIN_EPILOG = """\
examples:
  hf-cka compare google-bert/bert-base-uncased textattack/bert-base-uncased-SST-2
  hf-cka drift ./base ./checkpoint-500 ./checkpoint-1000
  hf-cka plot cka-results/r20261128T174455Z_3f9a --annot
  hf-cka push cka-results/r20261128T174455Z_3f9a me/bert-sst2-cka
  accelerate launch --multi_gpu --num_processes 2 -m hf_cka compare org/model-a org/model-b

Run `hf-cka COMMAND --help` for the options of a command."""

COMPARE_EPILOG = """\
examples:
  # two Hub models on the built-in probe corpus
  hf-cka compare google-bert/bert-base-uncased textattack/bert-base-uncased-SST-2

  # a model with itself (B omitted) at a pinned revision: embedding output and last block only
  hf-cka compare openai-community/gpt2@main --layers-a 0,-1

  # your own data: a Hub dataset or a local csv/json/jsonl/parquet/txt file
  hf-cka compare ./model-a ./model-b --dataset stanfordnlp/sst2 --split validation \\
      --text-column sentence --num-samples 2000 --max-length 64

  # half precision on a GPU, then publish the result as a Hub dataset
  hf-cka compare org/a org/b --dtype bfloat16 --device cuda --push-to-hub me/a-vs-b-cka

  # many GPUs: every process computes its share of the batches (the summary prints the count);
  # on a CPU-only machine, or without an `accelerate config`, say how many processes to start
  accelerate launch --multi_gpu --num_processes 2 -m hf_cka compare org/a org/b

Layers: "auto" (default) is the embedding output plus every transformer block. Integers index
that list like output_hidden_states (0 = embeddings, -1 = last block); names are module paths
such as encoder.layer.3 (add ":input" for a module's input)."""

DRIFT_EPILOG = """\
examples:
  # a base model against checkpoints saved during fine-tuning
  hf-cka drift ./base ./out/checkpoint-500 ./out/checkpoint-1000

  # several revisions of one Hub repo
  hf-cka drift org/model@step0 org/model@step1000 org/model@step2000 --num-samples 512

The printed table holds, per layer and checkpoint, the CKA of that layer in the base model and
the same layer in the checkpoint (1 = unchanged representation)."""

PLOT_EPILOG = """\
examples:
  hf-cka plot cka-results/r20261128T174455Z_3f9a
  hf-cka plot cka-results/r20261128T174455Z_3f9a --annot --output bert-cka.png
  hf-cka plot cka-results/d20261128T180102Z_9c1e              # a drift folder"""

PUSH_EPILOG = """\
examples:
  hf-cka push cka-results/r20261128T174455Z_3f9a me/bert-sst2-cka
  hf-cka push cka-results/d20261128T180102Z_9c1e me/finetune-drift --private

The dataset gets one parquet file per run (configs "scores" and "runs"), the heatmap and a
dataset card; pushing again to the same repo adds runs. Load a run back with
hf_cka.CKAResult.from_hub(REPO_ID) or datasets.load_dataset(REPO_ID, "scores")."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks; wider option column than the default."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are ONE line ``hf-cka: error: ...`` (status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


# --------------------------------------------------------------------------- argument types


def _layers(text: str) -> str | list[str | int]:
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


def _dpi(text: str) -> int:
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


def _colormap(name: str) -> str:
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


def _add_loading(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("loading")
    group.add_argument(
        "--dtype",
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


def _add_data(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        metavar="ID_OR_PATH",
        help="Hub dataset id or local csv/tsv/json/jsonl/parquet/txt file or folder"
        " (default: the built-in probe corpus)",
    )
    group.add_argument("--dataset-config", metavar="NAME", help="Hub dataset configuration")
    group.add_argument("--split", help="dataset split (default: train, or the first one)")
    group.add_argument(
        "--text-column",
        default=DEFAULTS.text_column,
        metavar="NAME",
        help=f"column holding the texts (default: {DEFAULTS.text_column}); image columns are"
        " found automatically",
    )
    group.add_argument(
        "--num-samples", type=_int, metavar="N", help="use at most N samples (default: all)"
    )
    group.add_argument(
        "--batch-size",
        type=_int,
        default=DEFAULTS.batch_size,
        metavar="N",
        help=f"samples per CKA minibatch, at least {MIN_BATCH}; also the forward batch size"
        f" (default: {DEFAULTS.batch_size})",
    )
    group.add_argument(
        "--max-length",
        type=_max_length,
        default=DEFAULTS.max_length,
        metavar="N",
        help=f"truncate texts to N tokens; 'none' for the model's limit (default:"
        f" {DEFAULTS.max_length})",
    )
    group.add_argument(
        "--no-sort",
        dest="sort_by_length",
        action="store_false",
        help="do not sort texts by length before the forward passes (slower; the same result"
        " up to float rounding, see docs/distributed.md)",
    )
    group.add_argument(
        "--chunk-batches",
        type=_int,
        default=DEFAULTS.chunk_batches,
        metavar="N",
        help=f"CKA batches sorted by length together (default: {DEFAULTS.chunk_batches})",
    )


def _add_estimator(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("estimator")
    group.add_argument(
        "--pooling",
        choices=get_args(Pooling),
        default=DEFAULTS.pooling,
        help="how token activations become one vector per example; padding never counts"
        f" (default: {DEFAULTS.pooling}). 'tokens' makes every token a sample (identical"
        " tokenizers only)",
    )
    group.add_argument(
        "--kernel",
        choices=get_args(Kernel),
        default=DEFAULTS.kernel,
        help=f"CKA kernel (default: {DEFAULTS.kernel})",
    )
    group.add_argument(
        "--threshold",
        type=float,
        default=DEFAULTS.threshold,
        metavar="X",
        help="RBF bandwidth factor: sigma = X times the median distance (default:"
        f" {DEFAULTS.threshold})",
    )
    group.add_argument(
        "--estimator",
        choices=get_args(Estimator),
        default=DEFAULTS.estimator,
        help="minibatch: Nguyen et al., with standard errors (default); linear / debiased: exact"
        " full-data linear CKA streamed with d_a x d_b memory per layer pair",
    )
    group.add_argument(
        "--null-permutations",
        type=_int,
        default=DEFAULTS.null_permutations,
        metavar="K",
        help="also compute CKA with B's samples shuffled K times per batch: the chance level"
        f" for this data size, saved as result.null (default: {DEFAULTS.null_permutations}, off)",
    )
    group.add_argument(
        "--seed",
        type=_int,
        default=DEFAULTS.seed,
        help=f"seed of the permutations (default: {DEFAULTS.seed})",
    )
    group.add_argument(
        "--target-stderr",
        type=float,
        metavar="SE",
        help="stop early once every cell's standard error is below SE (default: use all data)",
    )


def _add_output(parser: argparse.ArgumentParser, plot_file: str) -> None:
    group = parser.add_argument_group("output")
    group.add_argument(
        "--output",
        "-o",
        metavar="DIR",
        help=f"folder to write the result and {plot_file} to: new, empty or holding an earlier"
        " result; checked before any model is loaded (default: a new folder"
        " ./cka-results/<run id>/)",
    )
    group.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="also publish the result as a Hub dataset (created if missing; runs accumulate)",
    )
    group.add_argument(
        "--private", action="store_true", help="make a newly created Hub dataset private"
    )
    group.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="hide progress bars (for logs and CI)",
    )
    group.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="save the running sums in DIR every --checkpoint-every batches and when"
        " interrupted; the same command run again resumes from them",
    )
    group.add_argument(
        "--checkpoint-every",
        type=_int,
        default=DEFAULTS.checkpoint_every,
        metavar="N",
        help=f"batches between checkpoints (default: {DEFAULTS.checkpoint_every})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-cka`` argument parser with its four subcommands."""
    debug = _Parser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", help="show the full traceback when something fails"
    )
    parser = _Parser(
        prog=PROG, description=DESCRIPTION, epilog=MAIN_EPILOG, formatter_class=_Formatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, summary: str, epilog: str, usage: str | None = None
    ) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            usage=usage,
            help=summary,
            description=summary,
            epilog=epilog,
            parents=[debug],
            formatter_class=_Formatter,
        )

    compare = command(
        "compare",
        "CKA between every layer of model A and every layer of model B.",
        COMPARE_EPILOG,
        usage="%(prog)s [options] A [B]",
    )
    compare.set_defaults(handler=_compare)
    models = compare.add_argument_group("models")
    models.add_argument("model_a", metavar="A", help="Hub id, local folder or repo@revision")
    models.add_argument(
        "model_b",
        metavar="B",
        nargs="?",
        help="the second model (default: A itself, or A at --revision-b)",
    )
    models.add_argument("--revision-a", metavar="REV", help="branch, tag or commit of A")
    models.add_argument(
        "--revision-b",
        metavar="REV",
        help="branch, tag or commit of B; with B omitted, of A (compares two revisions of A)",
    )
    models.add_argument(
        "--layers-a",
        type=_layers,
        default="auto",
        metavar="LAYERS",
        help="layers of A: 'auto' (default) or comma-separated names/indices such as 0,-1",
    )
    models.add_argument(
        "--layers-b",
        type=_layers,
        metavar="LAYERS",
        help="layers of B (default: 'auto', or --layers-a when B is omitted)",
    )
    models.add_argument(
        "--part-a",
        choices=PARTS,
        default="encoder",
        help="which stack of an encoder-decoder A to use (default: encoder)",
    )
    models.add_argument(
        "--part-b",
        choices=PARTS,
        help="which stack of B (default: encoder, or --part-a when B is omitted)",
    )
    _add_loading(compare)
    _add_data(compare)
    _add_estimator(compare)
    _add_output(compare, HEATMAP_FILE)

    drift = command(
        "drift",
        "Same-layer CKA of a base model with each of several checkpoints.",
        DRIFT_EPILOG,
        usage="%(prog)s [options] BASE CKPT [CKPT ...]",
    )
    drift.set_defaults(handler=_drift)
    models = drift.add_argument_group("models")
    models.add_argument("base", metavar="BASE", help="the base model (Hub id, folder, repo@rev)")
    models.add_argument(
        "checkpoints", metavar="CKPT", nargs="+", help="checkpoints to compare with the base"
    )
    models.add_argument("--revision", metavar="REV", help="branch, tag or commit of BASE")
    models.add_argument(
        "--layers",
        type=_layers,
        default="auto",
        metavar="LAYERS",
        help="layers, the same in every model: 'auto' (default) or names/indices such as 0,-1",
    )
    models.add_argument(
        "--part",
        choices=PARTS,
        default="encoder",
        help="which stack of encoder-decoder models to use (default: encoder)",
    )
    _add_loading(drift)
    _add_data(drift)
    _add_estimator(drift)
    _add_output(drift, DRIFT_PLOT_FILE)

    plot = command("plot", "Re-plot a saved CKA or drift result.", PLOT_EPILOG)
    plot.set_defaults(handler=_plot)
    plot.add_argument("result_dir", type=Path, metavar="RESULT_DIR", help="a saved result folder")
    plot.add_argument(
        "--output",
        "-o",
        type=Path,
        metavar="PNG",
        help=f"image file to write (default: RESULT_DIR/{HEATMAP_FILE}, or {DRIFT_PLOT_FILE}"
        " for a drift)",
    )
    plot.add_argument("--annot", action="store_true", help="write each value in its heatmap cell")
    plot.add_argument(
        "--cmap", type=_colormap, default="magma", help="matplotlib colour map (default: magma)"
    )
    plot.add_argument(
        "--dpi", type=_dpi, default=DPI, help=f"resolution, 1 to {MAX_DPI} (default: {DPI})"
    )

    push = command("push", "Publish a saved result as a Hub dataset.", PUSH_EPILOG)
    push.set_defaults(handler=_push_command)
    push.add_argument("result_dir", type=Path, metavar="RESULT_DIR", help="a saved result folder")
    push.add_argument("repo_id", metavar="REPO_ID", help="dataset repo, e.g. me/bert-sst2-cka")
    push.add_argument(
        "--private", action="store_true", help="make a newly created Hub dataset private"
    )
    push.add_argument(
        "--token",
        type=clean_token,
        help="Hub token (default: your saved login or HF_TOKEN); never printed",
    )
    return parser


# --------------------------------------------------------------------------- commands


def _loading_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "dtype": args.dtype,
        "device": args.device,
        "device_map": args.device_map,
        "trust_remote_code": args.trust_remote_code,
        "token": args.token,
    }


def _run_options(args: argparse.Namespace) -> RunOptions:
    """The command's :class:`~hf_cka.options.RunOptions` (argparse dests are its field names)."""
    return RunOptions(**{k: v for k, v in vars(args).items() if k in RUN_OPTION_NAMES})


def _hide_progress_bars(also_datasets: bool) -> None:
    """Silence the loading bars of huggingface_hub, transformers (and datasets)."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()
    if also_datasets:
        import datasets

        datasets.disable_progress_bars()


def _prepare_run(args: argparse.Namespace) -> tuple[RunOptions, Path | None]:
    """Check all that can be checked before a model is loaded: the options, ``--private`` and
    ``--output`` (one ``hf-cka: error:`` line within a second, not after the run). Quiets the
    loading bars if asked. Returns the options and the output folder (``None``: the default)."""
    options = _run_options(args)
    if args.private and not args.push_to_hub:
        raise InvalidInputError("--private only applies with --push-to-hub REPO_ID")
    output = None if args.output is None else _check_output_folder(args.output)
    if output is None:
        _check_writable(Path.cwd(), "the default output ./cka-results/<run id>/")
    if not options.progress or not distributed.is_main_process():
        _hide_progress_bars(args.dataset is not None)
    return options, output


def _compare(args: argparse.Namespace) -> int:
    from .auto import AutoCKA
    from .models import parse_model_spec

    options, output = _prepare_run(args)
    b_omitted = args.model_b is None
    model_b = args.model_b
    if b_omitted and args.revision_b is not None:  # two revisions of A
        model_b = parse_model_spec(args.model_a)[0]
    auto = AutoCKA.from_pretrained(
        args.model_a,
        model_b,
        revision_a=args.revision_a,
        revision_b=args.revision_b,
        layers_a=args.layers_a,
        layers_b=args.layers_b or (args.layers_a if b_omitted else "auto"),
        part_a=args.part_a,
        part_b=args.part_b or (args.part_a if b_omitted else "encoder"),
        pooling=options.pooling,
        **_loading_options(args),
    )
    result = auto.compare(args.dataset, options)
    if not distributed.is_main_process():  # every process holds the result: one writes it
        return 0
    saved = _save(result, output, HEATMAP_FILE, args)
    print(_compare_summary(result, saved.folder, saved.url))
    return saved.report()


def _drift(args: argparse.Namespace) -> int:
    from .auto import AutoCKA

    options, output = _prepare_run(args)
    drift = AutoCKA.drift(
        args.base,
        args.checkpoints,
        args.dataset,
        revision=args.revision,
        layers=args.layers,
        part=args.part,
        options=options,
        **_loading_options(args),
    )
    if not distributed.is_main_process():
        return 0
    saved = _save(drift, output, DRIFT_PLOT_FILE, args)
    print(_drift_summary(drift, saved.folder, saved.url))
    return saved.report()


def _plot(args: argparse.Namespace) -> int:
    result = _load(args.result_dir)
    options: dict[str, Any] = {"cmap": args.cmap}
    if args.annot:
        if _is_drift(result):
            raise InvalidInputError(
                "--annot writes values into heatmap cells; a drift plot has no annotations"
                " (its values are printed by `hf-cka drift`)"
            )
        options["annot"] = True
    target = args.output or args.result_dir / _plot_file(result)  # one process writes it
    if distributed.is_main_process():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(_render(result, dpi=args.dpi, **options))
        print(f"wrote {target}")
    return 0


def _push_command(args: argparse.Namespace) -> int:
    result = _load(args.result_dir)
    if distributed.is_main_process():
        url = result.push_to_hub(
            args.repo_id, private=args.private or None, token=args.token, local_dir=args.result_dir
        )
        print(f"pushed {args.result_dir} to {url}")
    return 0


# --------------------------------------------------------------------------- results and files


def _is_drift(result: Any) -> bool:
    from .result import DriftResult

    return isinstance(result, DriftResult)


def _plot_file(result: Any) -> str:
    return DRIFT_PLOT_FILE if _is_drift(result) else HEATMAP_FILE


def _load(folder: Path) -> Any:
    """The ``CKAResult`` or ``DriftResult`` saved in ``folder``."""
    from .result import DRIFT_FILE, CKAResult, DriftResult

    if not folder.is_dir():
        raise InvalidInputError(
            f"{folder} is not a folder; expected a result folder written by `hf-cka compare`,"
            " `hf-cka drift` or result.save()"
        )
    return DriftResult.load(folder) if (folder / DRIFT_FILE).is_file() else CKAResult.load(folder)


def _render(result: Any, dpi: int = DPI, **options: Any) -> bytes:
    """PNG bytes of ``result.plot(**options)``; the figure is closed afterwards."""
    import matplotlib.pyplot as plt

    fig, _ = result.plot(**options)
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
        return buffer.getvalue()
    finally:
        plt.close(fig)


def _check_output_folder(text: str) -> Path:
    """``--output`` as a folder a result can be saved to, checked before any model is loaded.

    Raises:
        InvalidInputError: an empty path, a file, a path below a file, a non-empty folder that
            holds no result, or a place where this user cannot create files.
    """
    from .storage import holds_result

    if not text.strip():
        raise InvalidInputError(
            "--output is empty; expected a folder such as out/ (or no --output for"
            " ./cka-results/<run id>/)"
        )
    folder = Path(text)
    if folder.exists() and not folder.is_dir():
        raise InvalidInputError(
            f"--output {folder} is a file; expected a new folder, an empty one or one holding an"
            " earlier result"
        )
    if folder.is_dir() and any(folder.iterdir()) and not holds_result(folder):
        raise InvalidInputError(
            f"--output {folder} is a non-empty folder that holds no hf_cka result; choose a new"
            " or empty folder (a result folder is replaced)"
        )
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        raise InvalidInputError(
            f"--output {folder}: {existing} is a file, so no folder can be made below it"
        )
    _check_writable(existing, f"--output {folder}")
    return folder


def _check_writable(folder: Path, what: str) -> None:
    """Raise unless a file can be created in ``folder`` (tried, not guessed from permissions)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise InvalidInputError(
            f"{what}: cannot create files in {folder} ({err.strerror or err}); choose a folder"
            " you can write to"
        ) from err


@dataclasses.dataclass
class _Saved:
    """Where a result was saved, and why not where it was asked to be (``failure``)."""

    folder: Path
    url: str | None = None
    failure: str | None = None

    def report(self) -> int:
        """Print the failure (if any) on stderr; the exit status of the command."""
        if self.failure is None:
            return 0
        print(f"{PROG}: error: {self.failure}", file=sys.stderr)
        return EXIT_ERROR


def _save(result: Any, output: Path | None, plot_file: str, args: argparse.Namespace) -> _Saved:
    """Save ``result`` and its plot to ``output`` (default ./cka-results/<id>/), then push when
    asked. If saving fails there, the result goes to a fallback folder that is named: a finished
    run is never thrown away."""
    from .storage import DEFAULT_LOCAL_ROOT

    result_id = result.drift_id if _is_drift(result) else result.run_id
    default = DEFAULT_LOCAL_ROOT / result_id
    saved = _Saved(output or default)
    try:
        _write(result, saved.folder, plot_file)
    except (HfCkaError, OSError) as err:
        fallbacks = [default] if saved.folder != default else []
        saved.folder = _write_somewhere(result, plot_file, fallbacks, result_id)
        reason = " ".join(str(err).split())
        saved.failure = f"could not save to {output or default} ({reason}); saved to {saved.folder}"
    if args.push_to_hub:
        saved.url = result.push_to_hub(
            args.push_to_hub, private=args.private or None, token=args.token, local_dir=saved.folder
        )
    return saved


def _write(result: Any, folder: Path, plot_file: str) -> None:
    result.save(folder)
    (folder / plot_file).write_bytes(_render(result))


def _write_somewhere(result: Any, plot_file: str, folders: list[Path], result_id: str) -> Path:
    """The first of ``folders`` (then a new temporary folder) that ``result`` could be saved to."""
    for folder in folders:
        try:
            _write(result, folder, plot_file)
            return folder
        except (HfCkaError, OSError):
            continue
    folder = Path(tempfile.mkdtemp(prefix=f"hf-cka-{result_id}-"))
    _write(result, folder, plot_file)
    return folder


# --------------------------------------------------------------------------- summaries


def _model_line(name: str, model: ModelProvenance) -> str:
    line = name + (f"@{model.revision}" if model.revision else "")
    sha = model.commit_sha
    return line + (f" (commit {sha[:12]})" if sha and sha != model.revision else "")


def _samples_line(provenance: Provenance) -> str:
    data = provenance.data
    source = data.dataset or "?"
    for part in (data.dataset_config, data.split):
        if part:
            source += f" [{part}]"
    return (
        f"{provenance.n_samples} in {provenance.n_batches} batches of"
        f" {provenance.batch_size} from {source}"
    )


def _processes_line(provenance: Provenance) -> str:
    """How many processes shared the batches (1 unless launched with several)."""
    count = provenance.num_processes
    return f"{count} (batches shared round-robin)" if count != 1 else "1"


def _table(rows: Sequence[tuple[str, str]]) -> str:
    """``label  value`` lines, labels padded to one width; values may span several lines."""
    width = max(len(label) for label, _ in rows)
    indent = "\n" + " " * (width + 2)
    return "\n".join(f"{label:<{width}}  " + value.replace("\n", indent) for label, value in rows)


def _numbers(values: Sequence[float]) -> str:
    """Values with 3 decimals, wrapped to fit a terminal beside the labels of :func:`_table`."""
    return textwrap.fill("  ".join(f"{value:.3f}" for value in values), width=SUMMARY_WIDTH)


def _compare_summary(result: Any, folder: Path, url: str | None) -> str:
    import torch

    provenance = Provenance.from_dict(result.metadata)
    settings = f"pooling={provenance.pooling}, kernel={provenance.kernel}"
    rows = [
        ("model A", _model_line(result.model_a, provenance.model_a)),
        ("model B", _model_line(result.model_b, provenance.model_b)),
        (
            "layers",
            f"{result.shape[0]} x {result.shape[1]} ({settings}, dtype={provenance.dtype})",
        ),
        ("samples", _samples_line(provenance)),
        ("processes", _processes_line(provenance)),
    ]
    if result.shape[0] == result.shape[1]:
        rows.append(("diagonal", _numbers(result.matrix.diagonal().tolist())))
    rows.append(("mean CKA", f"{torch.nanmean(result.matrix).item():.4f} (all layer pairs)"))
    if result.stderr is not None:
        largest = torch.nan_to_num(result.stderr, nan=0.0).max().item()
        rows.append(("std. error", f"at most {largest:.4f} per cell (over batches)"))
    if result.null is not None:
        chance = torch.nanmean(result.null).item()
        rows.append(("chance CKA", f"{chance:.4f} (mean with B's samples permuted)"))
    rows.append(("saved to", f"{folder}/ (result.json, tensors.safetensors, {HEATMAP_FILE})"))
    if url:
        rows.append(("pushed to", url))
    return _table(rows)


def _drift_summary(drift: Any, folder: Path, url: str | None) -> str:
    rows = [("base", drift.base)]
    rows += [(f"checkpoint [{i}]", name) for i, name in enumerate(drift.checkpoints, start=1)]
    provenance = Provenance.from_dict(drift.results[0].metadata)
    rows.append(("samples", _samples_line(provenance)))
    rows.append(("processes", _processes_line(provenance)))
    width = max(len(layer) for layer in ["layer", *drift.layers])
    columns = "".join(f"{f'[{i}]':>7}" for i in range(1, len(drift.checkpoints) + 1))
    table = [f"{'layer':<{width}}{columns}"]
    for layer, values in zip(drift.layers, drift.similarity.tolist(), strict=True):
        table.append(f"{layer:<{width}}" + "".join(f"{value:>7.3f}" for value in values))
    footer = [("saved to", f"{folder}/ (drift.json, one folder per checkpoint, {DRIFT_PLOT_FILE})")]
    if url:
        footer.append(("pushed to", url))
    title = "same-layer CKA with the base (1 = unchanged):"
    return "\n".join([_table(rows), "", title, *table, "", _table(footer)])


# --------------------------------------------------------------------------- entry point


def _fail(err: BaseException, args: argparse.Namespace) -> int:
    """Print ``err`` as one ``hf-cka: error:`` line (after the traceback with ``--debug``)."""
    token = getattr(args, "token", None)
    if args.debug:
        sys.stderr.write(scrub(traceback.format_exc(), token))
    message = " ".join(str(err).split()) or type(err).__name__
    where = "" if distributed.is_main_process() else f"[process {distributed.process_index()}] "
    print(f"{PROG}: error: {where}{scrub(message, token)}", file=sys.stderr)
    return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    """Run ``hf-cka`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status.

    Returns:
        0 on success, 2 for a usage error or a failed run (one ``hf-cka: error:`` line on
        stderr), 130 when interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors
        return exit_.code if isinstance(exit_.code, int) else EXIT_ERROR
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        saved = getattr(args, "checkpoint_dir", None)
        resume = f"; progress is saved in {saved}: run the same command to resume" if saved else ""
        print(f"{PROG}: interrupted{resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (HfCkaError, OSError, ValueError) as err:
        return _fail(err, args)
