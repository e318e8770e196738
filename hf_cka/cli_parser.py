"""The ``hf-cka`` argument parser: its six subcommands, assembled from the option groups of
:mod:`hf_cka.cli_args` and the help texts of :mod:`hf_cka.cli_help`. :mod:`hf_cka.cli` runs the
command that ``args.command`` names.

Nothing heavy is imported here: ``hf-cka --help`` must stay fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import get_args

from . import __version__
from .cli_args import (
    DPI,
    DRIFT_PLOT_FILE,
    HEATMAP_FILE,
    MAX_DPI,
    PROG,
    HelpFormatter,
    Parser,
    add_data,
    add_estimator,
    add_layer_choice,
    add_loading,
    add_output,
    add_private,
    add_store_options,
    add_store_output,
    colormap_name,
    dpi_value,
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
from .options import DEFAULTS
from .pooling import Pooling
from .tokens import clean_token

# name: (summary, epilog, usage after "[options]"; None: argparse's own)
_COMMANDS = {
    "compare": (
        "CKA between every layer of model A and every layer of model B.",
        COMPARE_EPILOG,
        "A [B]",
    ),
    "drift": (
        "Same-layer CKA of a base model with each of several checkpoints.",
        DRIFT_EPILOG,
        "BASE CKPT [CKPT ...]",
    ),
    "fingerprint": (
        "Run ONE model and save what CKA needs of it (a fingerprint).",
        FINGERPRINT_EPILOG,
        "MODEL",
    ),
    "grid": (
        "CKA between every pair of N models, each run once, one at a time.",
        GRID_EPILOG,
        "M1 M2 [M ...]",
    ),
    "plot": ("Re-plot a saved CKA or drift result.", PLOT_EPILOG, None),
    "push": ("Publish a saved result or fingerprint as a Hub dataset.", PUSH_EPILOG, None),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-cka`` argument parser with its six subcommands (``args.command`` names the one
    given)."""
    debug = Parser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", help="show the full traceback when something fails"
    )
    parser = Parser(
        prog=PROG, description=DESCRIPTION, epilog=MAIN_EPILOG, formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str) -> argparse.ArgumentParser:
        summary, epilog, usage = _COMMANDS[name]
        return commands.add_parser(
            name,
            usage=usage and f"%(prog)s [options] {usage}",
            help=summary,
            description=summary,
            epilog=epilog,
            parents=[debug],
            formatter_class=HelpFormatter,
        )

    compare = command("compare")
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
    add_layer_choice(
        models,
        "-a",
        layers_help="layers of A: 'auto' (default) or comma-separated names/indices such as 0,-1",
        part_help="which stack of an encoder-decoder A to use, or which tower of a CLIP-style A"
        " (vision, text) (default: encoder)",
    )
    add_layer_choice(
        models,
        "-b",
        layers_help="layers of B (default: 'auto', or --layers-a when B is omitted)",
        part_help="which stack of B (default: encoder, or --part-a when B is omitted)",
        defaults=False,
    )
    add_loading(compare)
    add_data(compare)
    add_estimator(compare)
    add_output(compare, HEATMAP_FILE)

    drift = command("drift")
    models = drift.add_argument_group("models")
    models.add_argument("base", metavar="BASE", help="the base model (Hub id, folder, repo@rev)")
    models.add_argument(
        "checkpoints", metavar="CKPT", nargs="+", help="checkpoints to compare with the base"
    )
    models.add_argument("--revision", metavar="REV", help="branch, tag or commit of BASE")
    add_layer_choice(
        models,
        layers_help="layers, the same in every model: 'auto' (default) or names/indices such as"
        " 0,-1",
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

    fingerprint = command("fingerprint")
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

    grid = command("grid")
    models = grid.add_argument_group("models")
    models.add_argument(
        "models", metavar="M", nargs="+", help="models or fingerprints (at least 2)"
    )
    add_layer_choice(models)
    add_loading(grid)
    add_data(grid)
    add_estimator(grid)
    add_store_options(grid)
    add_store_output(grid, "the grid (grid.json, one folder per pair, grid.png)")

    plot, push = command("plot"), command("push")
    plot.add_argument("result_dir", type=Path, metavar="RESULT_DIR", help="a saved result folder")
    push.add_argument(
        "result_dir", type=Path, metavar="FOLDER", help="a saved result or fingerprint folder"
    )
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

    push.add_argument("repo_id", metavar="REPO_ID", help="dataset repo, e.g. me/bert-sst2-cka")
    add_private(push)
    push.add_argument(
        "--token",
        type=clean_token,
        help="Hub token (default: your saved login or HF_TOKEN); never printed",
    )
    return parser
