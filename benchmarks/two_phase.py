"""Benchmark cases of the two-phase path (issue 15): fingerprints, grids and one-model drift.

Used by ``run.py`` (``--cases two-phase grid grid-combine fingerprint-size drift-memory``):

* **two-phase**: the varied-length pair of ``pair-varied`` through the two-phase path --
  ``extract`` of each (already loaded) model, then ``combine`` -- against the dynamic-padding
  floor and the single-stream ``compare``;
* **grid**: ``AutoCKA.grid`` of 4 models (each loaded, extracted once, freed) against the 6
  pairwise ``from_pretrained(a, b).compare`` runs it replaces, model loading included in both;
  forward passes counted;
* **grid-combine**: an 8-model grid on the probe corpus: the extraction of the 8 stores
  (models loaded untimed) against the combine phase (all 36 pairs ``i <= j``);
* **fingerprint-size**: bytes on disk of the fingerprint of a config-built 12-block 768-wide
  BERT (random weights) on the probe corpus, without features;
* **drift-memory**: peak RSS (``VmHWM`` of ``/proc/self/status``; ``ru_maxrss`` is kept across
  ``execve`` on Linux, so a probe started by this big process would report its peak) of fresh
  subprocesses: a one-model self-comparison, ``drift`` of k checkpoints one model at a time
  (the default) and the streamed all-models drift; also each peak above the process's RSS
  after its imports.

This file is also the subprocess entry point of the RSS probes::

    python benchmarks/two_phase.py rss METHOD BASE CKPT1 ... -- TEXTS.json
"""

from __future__ import annotations

import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmark this checkout's hf_cka
from hf_cka import AutoCKA  # noqa: E402
from hf_cka.combine import combine  # noqa: E402
from hf_cka.extract import ExtractOptions, extract, release  # noqa: E402
from hf_cka.models import ModelLoader  # noqa: E402

MAX_LENGTH = 128


def two_phase_runner(auto: AutoCKA, texts: list[str], batch_size: int) -> Callable[[], Any]:
    """Fingerprint both (already loaded) models of ``auto``, then combine the two stores."""
    options = ExtractOptions(batch_size=batch_size, max_length=MAX_LENGTH, progress=False)

    def run() -> Any:
        store_a = extract(auto.model_a, auto.layers_a, "mean", texts, options)
        store_b = extract(auto.model_b, auto.layers_b, "mean", texts, options)
        return combine(store_a, store_b)

    return run


def grid_runners(
    folders: Sequence[str], texts: list[str], batch_size: int
) -> dict[str, Callable[[], Any]]:
    """``AutoCKA.grid`` of ``folders`` and the pairwise compares it replaces (loads included)."""
    run = {"batch_size": batch_size, "max_length": MAX_LENGTH, "progress": False}

    def grid() -> Any:
        return AutoCKA.grid(list(folders), texts, **run)

    def pairwise() -> Any:
        for i, a in enumerate(folders):
            for b in folders[i + 1 :]:
                AutoCKA.from_pretrained(a, b).compare(texts, **run)

    n = len(folders)
    return {f"grid of {n}": grid, f"{n * (n - 1) // 2} pairwise compares": pairwise}


def grid_combine_share(folders: Sequence[str], batch_size: int) -> dict[str, Any]:
    """Extraction of ``len(folders)`` stores on the probe corpus (models loaded untimed, one at
    a time) against combining every pair ``i <= j``: seconds and the combine share."""
    options = ExtractOptions(batch_size=batch_size, progress=False)
    stores, extraction_s = [], 0.0
    loader = ModelLoader()
    for folder in folders:
        loaded = loader.load(folder)
        layers = AutoCKA.from_pretrained(folder).layers_a
        started = time.perf_counter()
        stores.append(extract(loaded, layers, "mean", None, options))
        extraction_s += time.perf_counter() - started
        release(loaded)
        gc.collect()
    started = time.perf_counter()
    pairs = 0
    for i in range(len(stores)):
        for j in range(i, len(stores)):
            combine(stores[i], stores[j])
            pairs += 1
    combine_s = time.perf_counter() - started
    return {
        "models": len(folders),
        "pairs": pairs,
        "samples": stores[0].n_samples,
        "extraction_s": extraction_s,
        "combine_s": combine_s,
        "combine_share": combine_s / extraction_s,
    }


def fingerprint_size(
    workdir: Path, batch_size: int, blocks: int = 12, width: int = 768
) -> dict[str, Any]:
    """Bytes of the fingerprint (no features) of a random ``blocks``-block ``width``-wide BERT
    on the probe corpus, and its extraction time (model loading included)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = workdir / f"bert{blocks}x{width}-random"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        config = BertConfig(
            hidden_size=width,
            num_hidden_layers=blocks,
            num_attention_heads=max(1, width // 64),
            intermediate_size=4 * width,
        )
        BertModel(config).save_pretrained(folder)  # fmt: skip
        vocab = workdir / "vocab.txt"
        words = sorted({w for t in _probe() for w in t.lower().split()})
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
        BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    started = time.perf_counter()
    store = AutoCKA.fingerprint(str(folder), batch_size=batch_size, progress=False)
    extraction_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        store.save(tmp)
        files = {p.name: p.stat().st_size for p in Path(tmp).iterdir()}
    return {
        "layers": len(store.layers),
        "samples": store.n_samples,
        "batches": len(store.batch_sizes),
        "files": files,
        "total_mb": sum(files.values()) / 1e6,
        "extraction_s": extraction_s,
    }


def _probe() -> list[str]:
    from hf_cka.data import probe_corpus

    return probe_corpus()


# ----------------------------------------------------------------------------- peak RSS
def rss_probe(method: str, folders: Sequence[str], texts: list[str], batch_size: int) -> dict:
    """Peak RSS (KiB) of this process running ``method``; also its RSS after the imports."""
    baseline = _status_kib("VmRSS")
    run = {"batch_size": batch_size, "max_length": MAX_LENGTH, "progress": False}
    if method == "self":
        AutoCKA.from_pretrained(folders[0]).compare(texts, **run)
    elif method == "drift-one-at-a-time":
        AutoCKA.drift(folders[0], list(folders[1:]), texts, **run)
    elif method == "drift-all-models":
        AutoCKA.drift(folders[0], list(folders[1:]), texts, one_model_at_a_time=False, **run)
    else:
        raise SystemExit(f"unknown method {method!r}")
    peak = _status_kib("VmHWM")
    # ru_maxrss survives execve on Linux: a probe started by a big parent reports the parent's
    # peak, so it is recorded for reference only; VmHWM is this process's own high-water mark
    inherited = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "method": method,
        "peak_mib": peak / 1024,
        "after_imports_mib": baseline / 1024,
        "ru_maxrss_mib": inherited / 1024,
    }


def _status_kib(key: str) -> int:
    """``key`` (``VmRSS``, ``VmHWM``) of ``/proc/self/status``, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    return 0


def drift_memory(
    folders: Sequence[str], texts: list[str], batch_size: int, env: dict[str, str]
) -> dict[str, Any]:
    """The RSS probes, each in a fresh subprocess, and the ratios to the self-comparison."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(texts, handle)
    rows = {}
    for method in ("self", "drift-one-at-a-time", "drift-all-models"):
        chosen = folders[:1] if method == "self" else folders
        done = subprocess.run(
            [sys.executable, __file__, "rss", method, str(batch_size), *chosen, "--",
             handle.name],
            capture_output=True, text=True, check=False, env=env,
        )  # fmt: skip
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            rows[method] = {"method": method, "error": done.stderr.strip()[-300:]}
        else:
            rows[method] = json.loads(lines[-1])
    Path(handle.name).unlink()
    reference = rows["self"]
    for row in rows.values():
        if "error" not in row and "error" not in reference:
            row["x_self"] = row["peak_mib"] / reference["peak_mib"]
            above = reference["peak_mib"] - reference["after_imports_mib"]
            row["x_self_above_imports"] = (row["peak_mib"] - row["after_imports_mib"]) / above
    return {"k": len(folders) - 1, "rows": list(rows.values())}


def print_drift_memory(report: dict[str, Any]) -> None:
    """The RSS probes as a markdown table."""
    print(f"\n### drift memory: peak RSS of fresh processes, k = {report['k']} checkpoints\n")
    print("| run | peak RSS MiB | after imports MiB | x self | x self (above imports) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in report["rows"]:
        if "error" in row:
            print(f"| {row['method']} | error: {row['error'][:120]} | | | |")
            continue
        print(
            f"| {row['method']} | {row['peak_mib']:.0f} | {row['after_imports_mib']:.0f} | "
            f"{row.get('x_self', float('nan')):.2f} | "
            f"{row.get('x_self_above_imports', float('nan')):.2f} |"
        )


if __name__ == "__main__" and sys.argv[1:2] == ["rss"]:
    method, batch = sys.argv[2], int(sys.argv[3])
    split = sys.argv.index("--")
    models, texts_file = sys.argv[4:split], sys.argv[split + 1]
    print(json.dumps(rss_probe(method, models, json.loads(Path(texts_file).read_text()), batch)))
