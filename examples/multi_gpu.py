"""CKA on several GPUs: data parallel with ``accelerate launch``, or one big model per GPU set.

    accelerate launch --multi_gpu --num_processes 4 examples/multi_gpu.py   # 4 processes
    python examples/multi_gpu.py --device-map auto              # 1 process, models split
    python examples/multi_gpu.py --offline                      # tiny local models, 1 process

Data parallel: every process loads both models on its own device and takes every N-th CKA batch;
the summable HSIC states are all-reduced once at the end, so the matrix equals a single-process
run on the same batches. ``--device-map auto`` instead spreads each model's layers over all
visible GPUs in one process (for models too big for one device). Only the main process writes
``multi_gpu.png`` and the result folder ``multi_gpu/`` (and, with ``--offline``, the tiny models
in ``multi_gpu_offline_models/``). Same from the shell:
``accelerate launch --multi_gpu --num_processes 4 -m hf_cka compare MODEL_A MODEL_B``.
"""

import argparse
from pathlib import Path

from hf_cka import AutoCKA, distributed

MODEL_A = "openai-community/gpt2"
MODEL_B = "distilbert/distilgpt2"
OFFLINE_MODELS = Path("multi_gpu_offline_models")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offline", action="store_true", help="use tiny local models")
    parser.add_argument("--device-map", help="e.g. 'auto': split each model over the GPUs")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: checkpoint's)")
    args = parser.parse_args()

    model_a, model_b = MODEL_A, MODEL_B
    if args.offline:  # the main process saves tiny models to a folder that every process reads
        model_a, model_b = str(OFFLINE_MODELS / "a"), str(OFFLINE_MODELS / "b")
        if distributed.is_main_process():
            from _offline import tiny_bert

            tiny_bert(model_a, seed=0)
            tiny_bert(model_b, seed=1)
        distributed.wait_for_everyone()

    # Under a launcher every process puts the models on its own device (cuda:<local rank>).
    auto = AutoCKA.from_pretrained(model_a, model_b, dtype=args.dtype, device_map=args.device_map)
    result = auto.compare(batch_size=32, max_length=128)

    if distributed.is_main_process():
        print(f"{result} from {result.metadata['num_processes']} process(es)")
        fig, _ = result.plot()
        fig.savefig("multi_gpu.png", dpi=150)
        result.save("multi_gpu")


if __name__ == "__main__":
    main()
