"""Compare a pre-trained model with a fine-tuned copy, layer by layer, in one line.

    python examples/compare_two_checkpoints.py            # two checkpoints from the Hub
    python examples/compare_two_checkpoints.py --offline  # two tiny local models instead

Writes ``compare_two_checkpoints.png`` (the heatmap) and the result folder
``compare_two_checkpoints/`` (reload it with ``CKAResult.load``) in the current directory.
The same from the shell: ``hf-cka compare MODEL_A MODEL_B``.
"""

import argparse
import tempfile

from hf_cka import AutoCKA

MODEL_A = "google-bert/bert-base-uncased"
MODEL_B = "textattack/bert-base-uncased-SST-2"  # bert-base-uncased fine-tuned on SST-2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offline", action="store_true", help="use tiny local models")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_a, model_b = MODEL_A, MODEL_B
        if args.offline:
            from _offline import tiny_bert

            model_a = tiny_bert(f"{tmp}/base")
            model_b = tiny_bert(f"{tmp}/finetuned", noise=0.005)  # the base, slightly changed

        # The one-liner: load both models, run the built-in probe corpus, get a CKAResult.
        result = AutoCKA.from_pretrained(model_a, model_b).compare(num_samples=256)

    print(result)
    print("same-layer CKA:", [round(value, 3) for value in result.matrix.diagonal().tolist()])
    fig, _ = result.plot()
    fig.savefig("compare_two_checkpoints.png", dpi=150)
    result.save("compare_two_checkpoints")


if __name__ == "__main__":
    main()
