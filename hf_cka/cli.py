"""The ``hf-cka`` command line (also ``python -m hf_cka``).

Subcommands:

- ``compare A [B]``: CKA between the layers of two models; writes a result folder and a heatmap.
- ``drift BASE CKPT [CKPT ...]``: same-layer CKA of a base model with several checkpoints.
- ``fingerprint MODEL``: runs ONE model and writes its per-model store (a fingerprint).
- ``grid M1 M2 [M ...]``: CKA between every pair of N models, each run once.
- ``plot RESULT_DIR``: re-plots a saved result.
- ``push RESULT_DIR REPO_ID``: publishes a saved result as a Hub dataset.

Under ``accelerate launch -m hf_cka compare ...`` every process runs this CLI and computes its
shard of the batches; only the main process prints, writes files and pushes. Errors print one
line ``hf-cka: error: <message>`` and exit with status 2 (``--debug`` adds the traceback); an
interrupt exits with 130. The Hub token is never printed or written.
"""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from pathlib import Path
from typing import Any, get_args

from . import __version__, distributed
from .cli_args import (
    DPI,
    DRIFT_PLOT_FILE,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    HEATMAP_FILE,
    MAX_DPI,
    PARTS,
    PROG,
    RUN_OPTION_NAMES,
    HelpFormatter,
    Parser,
    add_data,
    add_estimator,
    add_layer_choice,
    add_loading,
    add_measure,
    add_output,
    add_store_options,
    add_store_output,
    colormap_name,
    dpi_value,
    layer_list,
)
from .cli_help import (
    COMPARE_EPILOG,
    DESCRIPTION,
    DRIFT_EPILOG,
    FINGERPRINT_EPILOG,
    GRID_EPILOG,
    MAIN_EPILOG,
    PLOT_EPILOG,
    PUSH_EPILOG,
)
from .cli_output import (
    check_output_folder,
    check_writable,
    compare_summary,
    drift_summary,
    fingerprint_summary,
    grid_summary,
    is_drift,
    load_result,
    plot_file_of,
    render_png,
    save_result,
)
from .errors import HfCkaError, InvalidInputError
from .options import DEFAULTS, RunOptions
from .pooling import Pooling
from .tokens import clean_token, scrub


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-cka`` argument parser with its six subcommands."""
    debug = Parser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", help="show the full traceback when something fails"
    )
    parser = Parser(
        prog=PROG, description=DESCRIPTION, epilog=MAIN_EPILOG, formatter_class=HelpFormatter
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
            formatter_class=HelpFormatter,
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
        type=layer_list,
        default="auto",
        metavar="LAYERS",
        help="layers of A: 'auto' (default) or comma-separated names/indices such as 0,-1",
    )
    models.add_argument(
        "--layers-b",
        type=layer_list,
        metavar="LAYERS",
        help="layers of B (default: 'auto', or --layers-a when B is omitted)",
    )
    models.add_argument(
        "--part-a",
        choices=PARTS,
        default="encoder",
        help="which stack of an encoder-decoder A to use, or which tower of a CLIP-style A"
        " (vision, text) (default: encoder)",
    )
    models.add_argument(
        "--part-b",
        choices=PARTS,
        help="which stack of B (default: encoder, or --part-a when B is omitted)",
    )
    add_loading(compare)
    add_data(compare)
    add_estimator(compare)
    add_measure(compare)
    add_output(compare, HEATMAP_FILE)

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
        type=layer_list,
        default="auto",
        metavar="LAYERS",
        help="layers, the same in every model: 'auto' (default) or names/indices such as 0,-1",
    )
    models.add_argument(
        "--part",
        choices=PARTS,
        default="encoder",
        help="stack (encoder, decoder) or tower (vision, text) to use (default: encoder)",
    )
    add_loading(drift)
    add_data(drift)
    add_estimator(drift)
    add_output(drift, DRIFT_PLOT_FILE)
    drift.add_argument(
        "--all-models-at-once",
        dest="one_model_at_a_time",
        action="store_false",
        help="load the base and every checkpoint together and stream the data once (needs k + 1"
        " models' memory; default: one model at a time)",
    )

    fingerprint = command(
        "fingerprint",
        "Run ONE model and save what CKA needs of it (a fingerprint).",
        FINGERPRINT_EPILOG,
        usage="%(prog)s [options] MODEL",
    )
    fingerprint.set_defaults(handler=_fingerprint)
    models = fingerprint.add_argument_group("model")
    models.add_argument("model", metavar="MODEL", help="Hub id, local folder or repo@revision")
    models.add_argument("--revision", metavar="REV", help="branch, tag or commit of MODEL")
    add_layer_choice(models)
    add_loading(fingerprint)
    add_data(fingerprint)
    add_store_options(fingerprint)
    fingerprint.add_argument(
        "--pooling",
        choices=[p for p in get_args(Pooling) if p != "tokens"],
        default=DEFAULTS.pooling,
        help="how token activations become one vector per example (default: mean)",
    )
    add_store_output(fingerprint, "the fingerprint (fingerprint.json, .safetensors, README.md)")

    grid = command(
        "grid",
        "CKA between every pair of N models, each run once, one at a time.",
        GRID_EPILOG,
        usage="%(prog)s [options] M1 M2 [M ...]",
    )
    grid.set_defaults(handler=_grid)
    models = grid.add_argument_group("models")
    models.add_argument(
        "models", metavar="M", nargs="+", help="models or fingerprints (at least 2)"
    )
    add_layer_choice(models)
    add_loading(grid)
    add_data(grid)
    add_estimator(grid)
    add_measure(grid)
    add_store_options(grid)
    add_store_output(grid, "the grid (grid.json, one folder per pair, grid.png)")

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
        "--cmap", type=colormap_name, default="magma", help="matplotlib colour map (default: magma)"
    )
    plot.add_argument(
        "--dpi", type=dpi_value, default=DPI, help=f"resolution, 1 to {MAX_DPI} (default: {DPI})"
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
    output = None if args.output is None else check_output_folder(args.output)
    if output is None:
        check_writable(Path.cwd(), "the default output ./cka-results/<run id>/")
    if not options.progress or not distributed.is_main_process():
        _hide_progress_bars(args.dataset is not None)
    return options, output


def _compare(args: argparse.Namespace) -> int:
    from .auto import AutoCKA
    from .model_files import parse_model_spec

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
    saved = save_result(result, output, HEATMAP_FILE, args)
    print(compare_summary(result, saved.folder, saved.url))
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
        one_model_at_a_time=args.one_model_at_a_time,
        options=options,
        **_loading_options(args),
    )
    if not distributed.is_main_process():
        return 0
    saved = save_result(drift, output, DRIFT_PLOT_FILE, args)
    print(drift_summary(drift, saved.folder, saved.url))
    return saved.report()


def _fingerprint(args: argparse.Namespace) -> int:
    from .auto import AutoCKA
    from .shards import SHARDS_DIR

    options, output = _prepare_run(args)
    folder = output or Path("cka-fingerprints") / re.sub(r"[^\w.-]+", "--", args.model)
    fingerprint = AutoCKA.fingerprint(
        args.model,
        args.dataset,
        revision=args.revision,
        layers=args.layers,
        part=args.part,
        shuffle_seed=args.shuffle_seed,
        features=args.features,
        shards_dir=folder / SHARDS_DIR,  # a killed run resumes from them; save() removes them
        options=options,
        **_loading_options(args),
    )
    if not distributed.is_main_process():
        return 0
    fingerprint.save(folder)
    url = None
    if args.push_to_hub:
        url = fingerprint.push_to_hub(
            args.push_to_hub, private=args.private or None, token=args.token
        )
    print(fingerprint_summary(fingerprint, folder, url))
    return 0


def _grid(args: argparse.Namespace) -> int:
    from .auto import AutoCKA
    from .storage import DEFAULT_LOCAL_ROOT

    if len(args.models) < 2:
        raise InvalidInputError(f"a grid needs at least 2 models, got {args.models}")
    options, output = _prepare_run(args)
    grid = AutoCKA.grid(
        args.models,
        args.dataset,
        layers=args.layers,
        part=args.part,
        shuffle_seed=args.shuffle_seed,
        features=args.features,
        options=options,
        **_loading_options(args),
    )
    if not distributed.is_main_process():
        return 0
    folder = output or DEFAULT_LOCAL_ROOT / grid.grid_id
    grid.save(folder)
    url = None
    if args.push_to_hub:
        url = grid.push_to_hub(
            args.push_to_hub, private=args.private or None, token=args.token, local_dir=folder
        )
    print(grid_summary(grid, folder, url))
    return 0


def _plot(args: argparse.Namespace) -> int:
    result = load_result(args.result_dir)
    options: dict[str, Any] = {"cmap": args.cmap}
    if args.annot:
        if is_drift(result):
            raise InvalidInputError(
                "--annot writes values into heatmap cells; a drift plot has no annotations"
                " (its values are printed by `hf-cka drift`)"
            )
        options["annot"] = True
    target = args.output or args.result_dir / plot_file_of(result)  # one process writes it
    if distributed.is_main_process():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(render_png(result, dpi=args.dpi, **options))
        print(f"wrote {target}")
    return 0


def _push_command(args: argparse.Namespace) -> int:
    result = load_result(args.result_dir)
    if distributed.is_main_process():
        url = result.push_to_hub(
            args.repo_id, private=args.private or None, token=args.token, local_dir=args.result_dir
        )
        print(f"pushed {args.result_dir} to {url}")
    return 0


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
