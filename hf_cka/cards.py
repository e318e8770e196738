"""Render the dataset card (README.md) of a Hub repository of CKA results.

The card lists every run of the repository. User-supplied strings (model ids, dataset names,
metadata) are data, never template code or YAML: the YAML front matter is produced by the YAML
dumper from fixed keys only, and every value printed into the Markdown body is escaped
(:func:`escape_markdown`) unless it is a validated identifier marked safe here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from importlib.resources import files
from typing import Any

import jinja2
from huggingface_hub import DatasetCard, DatasetCardData
from markupsafe import Markup

from hf_cka.errors import InvalidInputError
from hf_cka.provenance import ModelProvenance, Provenance
from hf_cka.storage import validate_repo_id, validate_run_id

TEMPLATE_NAME = "dataset_card_template.md"
FINGERPRINT_TEMPLATE_NAME = "fingerprint_card_template.md"
CARD_TAGS = ["cka", "representational-similarity", "hf-cka"]
CONFIGS = [
    {"config_name": name, "data_files": [{"split": "train", "path": f"data/{name}/*.parquet"}]}
    for name in ("scores", "runs")
]

_NEWLINES = re.compile(r"[\r\n\u2028\u2029\x85\x0b\x0c]+")
_MARKDOWN_SPECIALS = re.compile(r"([\\`*_\[\]{}|#!~$])")
_MISSING = "–"


def escape_markdown(text: str) -> str:
    """Escape ``text`` so that it renders literally inside a Markdown table cell.

    Line breaks become spaces (a value can neither end a table row nor start a new block),
    ``& < >`` become HTML entities (no raw HTML), and Markdown/KaTeX/template punctuation
    (backslash, backticks, ``* _ [ ] { } | # ! ~ $``) is backslash-escaped; parentheses are
    harmless once brackets are escaped.
    """
    text = _NEWLINES.sub(" ", str(text))
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN_SPECIALS.sub(r"\\\1", text)


def _finalize(value: Any) -> Any:
    """Jinja ``finalize`` hook: escape every printed value that is not explicitly safe."""
    if isinstance(value, Markup):
        return value
    if value is None or value == "":
        return _MISSING
    return escape_markdown(str(value))


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        autoescape=False,  # Markdown, not HTML: escaping is done by ``_finalize``
        finalize=_finalize,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def _model_cell(model: str, provenance: ModelProvenance) -> str:
    """``model @ revision (sha)`` with the parts that are known."""
    text = model
    if provenance.revision:
        text += f" @ {provenance.revision}"
    if provenance.commit_sha:
        text += f" ({str(provenance.commit_sha)[:12]})"
    return text


def _versions_cell(versions: Any) -> str | None:
    if isinstance(versions, Mapping):
        return ", ".join(f"{name} {version}" for name, version in versions.items()) or None
    return None if versions is None else str(versions)


def _estimator_cell(provenance: Provenance) -> str | None:
    """The CKA estimator, or another measure with its parameters (``mutual_knn (k=5)``)."""
    if provenance.estimator is not None or provenance.measure in (None, "cka"):
        return provenance.estimator
    params = provenance.measure_params or {}
    listed = ", ".join(f"{name}={value}" for name, value in params.items())
    return f"{provenance.measure}" + (f" ({listed})" if listed else "")


def _run_view(run: Mapping[str, Any]) -> dict[str, Any]:
    """The values of one run as the template prints them (still unescaped user data)."""
    for key in ("model_a", "model_b"):
        if not isinstance(run.get(key), str) or not run[key]:
            raise InvalidInputError(f"every run needs a non-empty string {key!r}; got {run!r}")
    validate_run_id(run.get("run_id"))
    provenance = Provenance.from_dict(run.get("metadata") or {})
    shape = None
    if run.get("num_layers_a") is not None and run.get("num_layers_b") is not None:
        shape = f"{run['num_layers_a']} × {run['num_layers_b']}"
    wall_time = provenance.wall_time_s
    return {
        "run_id": run["run_id"],
        "created_at": run.get("created_at") or provenance.created_at,
        "model_a": _model_cell(run["model_a"], provenance.model_a),
        "model_b": _model_cell(run["model_b"], provenance.model_b),
        "shape": shape,
        "data": provenance.data.label(),
        "versions": _versions_cell(provenance.versions),
        "pooling": provenance.pooling,
        "estimator": _estimator_cell(provenance),
        "n_samples": provenance.n_samples,
        "dtype": provenance.dtype,
        "batch_size": provenance.batch_size,
        "n_batches": provenance.n_batches,
        "max_length": provenance.max_length,
        "num_processes": provenance.num_processes,
        "wall_time_s": f"{wall_time:.1f}" if isinstance(wall_time, float) else wall_time,
    }


def render_dataset_card(repo_id: str, runs: Sequence[Mapping[str, Any]]) -> DatasetCard:
    """Render the dataset card of a repository holding ``runs``.

    Args:
        repo_id: The Hub dataset repository, e.g. ``"me/bert-sst2-cka"``.
        runs: One mapping per run with ``run_id``, ``model_a``, ``model_b`` and optionally
            ``created_at``, ``num_layers_a``, ``num_layers_b`` and ``metadata`` (a dict with the
            keys :class:`~hf_cka.CKAResult` records). Listed oldest first
            (by ``created_at``, then ``run_id``); the heatmap shown is the newest run's
            ``plots/<run_id>.png``.

    Returns:
        The card, whose YAML declares the ``scores`` and ``runs`` configs (single split
        ``train``, files ``data/{scores,runs}/*.parquet``).

    Raises:
        InvalidInputError: ``repo_id`` is not a valid repository id, ``runs`` is empty, or a
            run lacks its id or model names.
    """
    validate_repo_id(repo_id)
    if not runs:
        raise InvalidInputError("a dataset card needs at least one run; got none")
    views = sorted(
        (_run_view(run) for run in runs), key=lambda v: (v["created_at"] or "", v["run_id"])
    )
    latest = dict(views[-1])
    # Run ids are validated identifiers (``validate_run_id``): safe inside a link target.
    latest["plot_path"] = Markup(f"plots/{latest['run_id']}.png")
    card_data = DatasetCardData(
        pretty_name=f"CKA results {repo_id}", tags=list(CARD_TAGS), configs=CONFIGS
    )
    content = _render(
        TEMPLATE_NAME,
        card_yaml=Markup(card_data.to_yaml()),
        repo_id=repo_id,
        runs=views,
        latest=latest,
    )
    return DatasetCard(content)


def render_fingerprint_card(fingerprint: Any) -> str:
    """The dataset card (``README.md``) of a :class:`~hf_cka.fingerprint.Fingerprint`."""
    return _render(
        FINGERPRINT_TEMPLATE_NAME,
        fp=fingerprint,
        settings=fingerprint.settings,
        data=fingerprint.data,
        model=fingerprint.model,
        layers=", ".join(fingerprint.layers),
        card_yaml=Markup("tags:\n- cka\n- hf-cka\n- hf-cka-fingerprint"),
    )


def _render(template_name: str, **values: Any) -> str:
    """The template ``template_name`` of ``model_cards/`` rendered with ``values``."""
    template = files("hf_cka_model_cards").joinpath(template_name).read_text(encoding="utf-8")
    return _environment().from_string(template).render(**values)
