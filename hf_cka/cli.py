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
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import distributed
from .cli_args import (
    DRIFT_PLOT_FILE,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    HEATMAP_FILE,
    PROG,
    RUN_OPTION_NAMES,
)
from .cli_output import (
    Saved,
    check_output_folder,
    check_writable,
    compare_summary,
    drift_summary,
    fingerprint_summary,
    grid_summary,
    is_drift,
    load_publishable,
    load_result,
    plot_file_of,
    push,
    render_png,
    save_result,
    save_store,
)
from .cli_parser import build_parser
from .errors import HfCkaError, InvalidInputError
from .options import RunOptions
from .tokens import scrub

# the options passed through to AutoCKA under their argparse dests
_LOADING = ("dtype", "device", "device_map", "trust_remote_code", "token")
_STORE = ("layers", "part", "shuffle_seed", "features")


# --------------------------------------------------------------------------- commands


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The options ``names`` of the command line, as keywords of the same names."""
    return {name: getattr(args, name) for name in names}


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
        layers_b=args.layers_b or (args.layers_a if b_omitted else "auto"),
        part_b=args.part_b or (args.part_a if b_omitted else "encoder"),
        pooling=options.pooling,
        **_given(args, "revision_a", "revision_b", "layers_a", "part_a", *_LOADING),
    )
    result = auto.compare(args.dataset, options)
    return _finish(result, lambda: save_result(result, output, HEATMAP_FILE, args), compare_summary)


def _drift(args: argparse.Namespace) -> int:
    from .auto import AutoCKA

    options, output = _prepare_run(args)
    drift = AutoCKA.drift(
        args.base,
        args.checkpoints,
        args.dataset,
        options=options,
        **_given(args, "revision", "layers", "part", "one_model_at_a_time", *_LOADING),
    )
    return _finish(drift, lambda: save_result(drift, output, DRIFT_PLOT_FILE, args), drift_summary)


def _fingerprint(args: argparse.Namespace) -> int:
    from .auto import AutoCKA
    from .fingerprint import default_folder
    from .shards import SHARDS_DIR

    options, output = _prepare_run(args)
    folder = output or default_folder(args.model)
    fingerprint = AutoCKA.fingerprint(
        args.model,
        args.dataset,
        shards_dir=folder / SHARDS_DIR,  # a killed run resumes from them; save() removes them
        options=options,
        **_given(args, "revision", *_STORE, *_LOADING),
    )
    return _finish(fingerprint, lambda: save_store(fingerprint, folder, args), fingerprint_summary)


def _grid(args: argparse.Namespace) -> int:
    from .auto import AutoCKA
    from .storage import DEFAULT_LOCAL_ROOT

    if len(args.models) < 2:
        raise InvalidInputError(f"a grid needs at least 2 models, got {args.models}")
    options, output = _prepare_run(args)
    grid = AutoCKA.grid(
        args.models, args.dataset, options=options, **_given(args, *_STORE, *_LOADING)
    )

    def save() -> Saved:
        folder = output or DEFAULT_LOCAL_ROOT / grid.grid_id
        return save_store(grid, folder, args)

    return _finish(grid, save, grid_summary)


def _finish(
    made: Any, save: Callable[[], Saved], summary: Callable[[Any, Path, str | None], str]
) -> int:
    """On the main process only (every process holds what the run made: one writes it): save it
    (and push it when asked), print its summary; the exit status."""
    if not distributed.is_main_process():
        return 0
    saved = save()
    print(summary(made, saved.folder, saved.url))
    return saved.report()


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
    result = load_publishable(args.result_dir)
    if distributed.is_main_process():
        url = push(result, args.repo_id, args, args.result_dir)
        print(f"pushed {args.result_dir} to {url}")
    return 0


# --------------------------------------------------------------------------- entry point

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "compare": _compare,
    "drift": _drift,
    "fingerprint": _fingerprint,
    "grid": _grid,
    "plot": _plot,
    "push": _push_command,
}


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
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        saved = getattr(args, "checkpoint_dir", None)
        resume = f"; progress is saved in {saved}: run the same command to resume" if saved else ""
        print(f"{PROG}: interrupted{resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (HfCkaError, OSError, ValueError) as err:
        return _fail(err, args)
