"""Publish a CKA result as a Hub dataset and load it back.

    hf auth login                                          # once: a token with write access
    python examples/publish_to_hub.py                      # pushes to <you>/hf-cka-example
    python examples/publish_to_hub.py --repo-id me/my-cka  # or to a repo of your choice
    python examples/publish_to_hub.py --offline            # tiny local models; needs HF_ENDPOINT

The dataset gets the scores (one row per layer pair), the run's provenance, the heatmap and a
dataset card; pushing again adds a run. ``push_to_hub`` first saves the result locally (here in
``publish_to_hub/``), so nothing is lost if the upload fails. With ``--offline`` and no
``HF_ENDPOINT`` (e.g. a local Hub server) the example saves locally and stops.
Same from the shell: ``hf-cka compare A B --push-to-hub REPO_ID``.
"""

import argparse
import os
import tempfile

import torch
from huggingface_hub import HfApi

from hf_cka import AutoCKA, CKAResult

MODEL_A = "prajjwal1/bert-tiny"
MODEL_B = "prajjwal1/bert-mini"
LOCAL_COPY = "publish_to_hub"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offline", action="store_true", help="use tiny local models")
    parser.add_argument("--repo-id", help="dataset repo (default: <your user>/hf-cka-example)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_a, model_b = MODEL_A, MODEL_B
        if args.offline:
            from _offline import tiny_bert

            model_a = tiny_bert(f"{tmp}/small", num_layers=2, hidden_size=32)
            model_b = tiny_bert(f"{tmp}/wide", num_layers=3, hidden_size=48)
        result = AutoCKA.from_pretrained(model_a, model_b).compare(num_samples=128)

    if args.offline and "HF_ENDPOINT" not in os.environ:
        result.save(LOCAL_COPY)
        print(f"Saved to {LOCAL_COPY}/. --offline has no Hub to push to: set HF_ENDPOINT to a")
        print("Hub server (and log in to it), or run without --offline to use huggingface.co.")
        return

    repo_id = args.repo_id or f"{HfApi().whoami()['name']}/hf-cka-example"
    url = result.push_to_hub(repo_id, local_dir=LOCAL_COPY)
    print(f"pushed run {result.run_id}: {url}")

    # Anyone can now load the run (or, with `datasets`, every run of the repo).
    loaded = CKAResult.from_hub(repo_id, run_id=result.run_id)
    assert torch.equal(loaded.matrix, result.matrix)
    print(f"loaded back {loaded}")


if __name__ == "__main__":
    main()
