"""What ``hf-cka`` writes: result folders (with a fallback when the asked one fails), PNGs, and
the summaries printed after a run, read from the result's :class:`~hf_cka.provenance.Provenance`.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .cli_args import (
    DPI,
    DRIFT_PLOT_FILE,
    EXIT_ERROR,
    HEATMAP_FILE,
    PROG,
    SUMMARY_WIDTH,
)
from .errors import HfCkaError, InvalidInputError
from .provenance import ModelProvenance, Provenance

# --------------------------------------------------------------------------- results and files


def is_drift(result: Any) -> bool:
    from .drift import DriftResult

    return isinstance(result, DriftResult)


def plot_file_of(result: Any) -> str:
    from .grid import GridResult
    from .storage import GRID_PLOT_FILE

    if isinstance(result, GridResult):
        return GRID_PLOT_FILE
    return DRIFT_PLOT_FILE if is_drift(result) else HEATMAP_FILE


def load_result(folder: Path) -> Any:
    """The ``CKAResult``, ``DriftResult`` or ``GridResult`` saved in ``folder``."""
    from .drift import DriftResult
    from .grid import GRID_FILE, GridResult
    from .result import DRIFT_FILE, CKAResult

    if not folder.is_dir():
        raise InvalidInputError(
            f"{folder} is not a folder; expected a result folder written by `hf-cka compare`,"
            " `hf-cka drift` or result.save()"
        )
    if (folder / GRID_FILE).is_file():
        return GridResult.load(folder)
    return DriftResult.load(folder) if (folder / DRIFT_FILE).is_file() else CKAResult.load(folder)


def load_publishable(folder: Path) -> Any:
    """The fingerprint saved in ``folder``, else its result (:func:`load_result`)."""
    from .fingerprint import Fingerprint
    from .model_files import FINGERPRINT_FILE

    if (folder / FINGERPRINT_FILE).is_file():
        return Fingerprint.load(folder)
    return load_result(folder)


def render_png(result: Any, dpi: int = DPI, **options: Any) -> bytes:
    """PNG bytes of ``result.plot(**options)``; the figure is closed afterwards."""
    import matplotlib.pyplot as plt

    fig, _ = result.plot(**options)
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
        return buffer.getvalue()
    finally:
        plt.close(fig)


def check_output_folder(text: str) -> Path:
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
    check_writable(existing, f"--output {folder}")
    return folder


def check_writable(folder: Path, what: str) -> None:
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
class Saved:
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


def save_result(
    result: Any, output: Path | None, plot_file: str, args: argparse.Namespace
) -> Saved:
    """Save ``result`` and its plot to ``output`` (default ./cka-results/<id>/), then push when
    asked. If saving fails there, the result goes to a fallback folder that is named: a finished
    run is never thrown away."""
    from .storage import DEFAULT_LOCAL_ROOT

    result_id = result.drift_id if is_drift(result) else result.run_id
    default = DEFAULT_LOCAL_ROOT / result_id
    saved = Saved(output or default)
    try:
        _write(result, saved.folder, plot_file)
    except (HfCkaError, OSError) as err:
        fallbacks = [default] if saved.folder != default else []
        saved.folder = _write_somewhere(result, plot_file, fallbacks, result_id)
        reason = " ".join(str(err).split())
        saved.failure = f"could not save to {output or default} ({reason}); saved to {saved.folder}"
    saved.url = push(result, args.push_to_hub, args, saved.folder)
    return saved


def save_store(store: Any, folder: Path, args: argparse.Namespace) -> Saved:
    """Save a fingerprint or a grid to ``folder``, then push it when asked."""
    store.save(folder)
    return Saved(folder, push(store, args.push_to_hub, args, folder))


def push(store: Any, repo_id: str | None, args: argparse.Namespace, saved: Path) -> str | None:
    """``store.push_to_hub(repo_id)`` with ``--private`` and ``--token``, its local copy the
    folder ``saved`` it was saved to; its URL (None without a ``repo_id``)."""
    if not repo_id:
        return None
    options = {"private": args.private or None, "token": args.token, "local_dir": saved}
    return store.push_to_hub(repo_id, **options)


def _write(result: Any, folder: Path, plot_file: str) -> None:
    result.save(folder)
    (folder / plot_file).write_bytes(render_png(result))


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


def _values(values: Sequence[float]) -> str:
    """One row of a matrix: values with 3 decimals in columns 7 wide."""
    return "".join(f"{value:>7.3f}" for value in values)


def _destinations(saved: str, url: str | None) -> list[tuple[str, str]]:
    """The ``saved to`` row, and the ``pushed to`` row after a push."""
    return [("saved to", saved)] + ([("pushed to", url)] if url else [])


def compare_summary(result: Any, folder: Path, url: str | None) -> str:
    from .measures import measure_label

    provenance = Provenance.from_dict(result.metadata)
    measure = provenance.measure or "cka"
    label = measure_label(result.metadata)
    settings = f"pooling={provenance.pooling}, kernel={provenance.kernel}"
    if measure != "cka":
        params = "".join(f", {k}={v}" for k, v in (provenance.measure_params or {}).items())
        settings = f"pooling={provenance.pooling}, measure={measure}{params}"
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
    mean = torch.nanmean(result.matrix).item()
    rows.append((f"mean {label}", f"{mean:.4f} (all layer pairs)"))
    if result.stderr is not None:
        largest = torch.nan_to_num(result.stderr, nan=0.0).max().item()
        rows.append(("std. error", f"at most {largest:.4f} per cell (over batches)"))
    if result.null is not None:
        chance = torch.nanmean(result.null).item()
        rows.append((f"chance {label}", f"{chance:.4f} (mean with B's samples permuted)"))
    saved = f"{folder}/ (result.json, tensors.safetensors, {HEATMAP_FILE})"
    return _table(rows + _destinations(saved, url))


def drift_summary(drift: Any, folder: Path, url: str | None) -> str:
    from .measures import measure_label

    rows = [("base", drift.base)]
    rows += [(f"checkpoint [{i}]", name) for i, name in enumerate(drift.checkpoints, start=1)]
    provenance = Provenance.from_dict(drift.results[0].metadata)
    rows.append(("samples", _samples_line(provenance)))
    rows.append(("processes", _processes_line(provenance)))
    width = max(len(layer) for layer in ["layer", *drift.layers])
    columns = "".join(f"{f'[{i}]':>7}" for i in range(1, len(drift.checkpoints) + 1))
    table = [f"{'layer':<{width}}{columns}"]
    for layer, values in zip(drift.layers, drift.similarity.tolist(), strict=True):
        table.append(f"{layer:<{width}}" + _values(values))
    saved = f"{folder}/ (drift.json, one folder per checkpoint, {DRIFT_PLOT_FILE})"
    title = f"same-layer {measure_label(drift.results[0].metadata)} with the base (1 = unchanged):"
    return "\n".join([_table(rows), "", title, *table, "", _table(_destinations(saved, url))])


def fingerprint_summary(fingerprint: Any, folder: Path, url: str | None) -> str:
    model = ModelProvenance.from_dict({f"{k}_x": v for k, v in fingerprint.model.items()}, "x")
    settings = fingerprint.settings
    rows = [
        ("model", _model_line(fingerprint.name, model)),
        ("layers", f"{len(fingerprint.layers)} (pooling={settings.get('pooling')})"),
        ("samples", f"{fingerprint.n_samples} in {len(fingerprint.batch_sizes)} batches of"
                    f" {settings.get('batch_size')} from {fingerprint.data.get('dataset')}"),
    ]  # fmt: skip
    return _table(rows + _destinations(f"{folder}/", url))


def grid_summary(grid: Any, folder: Path, url: str | None) -> str:
    from .storage import GRID_PLOT_FILE

    rows = [(f"model [{i}]", name) for i, name in enumerate(grid.models)]
    rows.append(("samples", _samples_line(Provenance.from_dict(grid.results[0, 1].metadata))))
    summary = [f"{'':>8}" + "".join(f"{f'[{j}]':>7}" for j in range(len(grid.models)))]
    for i, values in enumerate(grid.summary.tolist()):
        summary.append(f"{f'[{i}]':>8}" + _values(values))
    saved = f"{folder}/ (grid.json, one folder per pair, {GRID_PLOT_FILE})"
    title = f"mean over the layers of [i] of their best {grid.measure_label} in [j]:"
    return "\n".join([_table(rows), "", title, *summary, "", _table(_destinations(saved, url))])
