"""Watch the layers of a model drift away from the base model while it is fine-tuned.

    python examples/finetune_drift.py            # fine-tunes prajjwal1/bert-tiny (Hub) on CPU
    python examples/finetune_drift.py --offline  # a tiny local BERT instead

Fine-tunes a small BERT with a classification head for 10 steps on a handful of labelled
sentences, saving checkpoints at steps 0, 5 and 10 in ``finetune_drift_checkpoints/``. Then
``AutoCKA.drift`` compares the step-0 model with the later checkpoints layer by layer (the base
runs one forward pass per batch for all checkpoints). Writes ``finetune_drift.png`` and the
result folder ``finetune_drift/`` in the current directory. Same from the shell:
``hf-cka drift finetune_drift_checkpoints/checkpoint-0 finetune_drift_checkpoints/checkpoint-5 ...``
"""

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_cka import AutoCKA

BASE = "prajjwal1/bert-tiny"
STEPS, SAVE_AT = 10, (0, 5, 10)
LEARNING_RATE = 1e-2  # high on purpose: the layers visibly move in 10 steps
CHECKPOINTS = Path("finetune_drift_checkpoints")
SENTENCES = [
    ("a warm, funny and beautifully acted film", 1),
    ("the best meal I have had in years", 1),
    ("a delightful surprise from start to finish", 1),
    ("clear instructions and friendly staff", 1),
    ("dull, slow and far too long", 0),
    ("the food was cold and the service rude", 0),
    ("a confusing plot with wooden dialogue", 0),
    ("it broke after two days of use", 0),
]


def fine_tune(base: str) -> list[Path]:
    """Train ``base`` with a fresh classification head; return the checkpoint folders."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    texts, labels = zip(*SENTENCES, strict=True)
    batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    batch["labels"] = torch.tensor(labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    saved = []
    model.train()
    for step in range(STEPS + 1):
        if step in SAVE_AT:
            folder = CHECKPOINTS / f"checkpoint-{step}"
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            saved.append(folder)
        if step < STEPS:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            print(f"step {step + 1}: loss {loss.item():.3f}")
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offline", action="store_true", help="use a tiny local model")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.offline:
            from _offline import tiny_bert

            base = str(tiny_bert(f"{tmp}/bert", num_labels=2))
        else:
            base = BASE
        step0, *later = fine_tune(base)

    # The classification head is not a layer of the base model: CKA compares the encoders.
    drift = AutoCKA.drift(str(step0), [str(path) for path in later], num_samples=256)
    print(f"{'layer':<24}" + "".join(f"{path.name:>14}" for path in later))
    for layer, row in zip(drift.layers, drift.similarity.tolist(), strict=True):
        print(f"{layer:<24}" + "".join(f"{value:14.3f}" for value in row))
    fig, _ = drift.plot()
    fig.savefig("finetune_drift.png", dpi=150)
    drift.save("finetune_drift")


if __name__ == "__main__":
    main()
