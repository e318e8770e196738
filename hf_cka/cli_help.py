"""The help texts of ``hf-cka``: the description and each command's epilog of examples.

:func:`hf_cka.cli_parser.build_parser` puts them into the parser (plain strings: ``--help`` stays
fast).
"""

DESCRIPTION = """\
Centered Kernel Alignment (CKA) between the layers of Hugging Face models.

Models are Hub ids, local folders, or "repo@revision". Without --dataset the built-in probe
corpus (a few hundred varied English sentences) is used. Results are saved as folders (result.json +
tensors.safetensors + a PNG) that `hf-cka plot` and `hf-cka push` read back."""

MAIN_EPILOG = """\
examples:
  hf-cka compare google-bert/bert-base-uncased textattack/bert-base-uncased-SST-2
  hf-cka drift ./base ./checkpoint-500 ./checkpoint-1000
  hf-cka plot cka-results/r20261128T174455Z_3f9a --annot
  hf-cka push cka-results/r20261128T174455Z_3f9a me/bert-sst2-cka
  accelerate launch --multi_gpu --num_processes 2 -m hf_cka compare org/model-a org/model-b

Run `hf-cka COMMAND --help` for the options of a command."""

COMPARE_EPILOG = """\
examples:
  # two Hub models on the built-in probe corpus
  hf-cka compare google-bert/bert-base-uncased textattack/bert-base-uncased-SST-2

  # a model with itself (B omitted) at a pinned revision: embedding output and last block only
  hf-cka compare openai-community/gpt2@main --layers-a 0,-1

  # your own data: a Hub dataset or a local csv/json/jsonl/parquet/txt file
  hf-cka compare ./model-a ./model-b --dataset stanfordnlp/sst2 --split validation \\
      --text-column sentence --num-samples 2000 --max-length 64

  # half precision on a GPU, then publish the result as a Hub dataset
  hf-cka compare org/a org/b --dtype bfloat16 --device cuda --push-to-hub me/a-vs-b-cka

  # many GPUs: every process computes its share of the batches (the summary prints the count);
  # on a CPU-only machine, or without an `accelerate config`, say how many processes to start
  accelerate launch --multi_gpu --num_processes 2 -m hf_cka compare org/a org/b

Layers: "auto" (default) is the embedding output plus every transformer block. Integers index
that list like output_hidden_states (0 = embeddings, -1 = last block); names are module paths
such as encoder.layer.3 (add ":input" for a module's input)."""

DRIFT_EPILOG = """\
examples:
  # a base model against checkpoints saved during fine-tuning
  hf-cka drift ./base ./out/checkpoint-500 ./out/checkpoint-1000

  # several revisions of one Hub repo
  hf-cka drift org/model@step0 org/model@step1000 org/model@step2000 --num-samples 512

The printed table holds, per layer and checkpoint, the CKA of that layer in the base model and
the same layer in the checkpoint (1 = unchanged representation)."""

FINGERPRINT_EPILOG = """\
examples:
  # publish what CKA needs of a model on the probe corpus: others compare with it by running
  # only their own model (hf-cka compare me/bert-fingerprint ./my-model)
  hf-cka fingerprint google-bert/bert-base-uncased --output bert-fp --push-to-hub me/bert-fp

  # on your own data, with the pooled features for the exact estimators
  hf-cka fingerprint ./model --dataset stanfordnlp/sst2 --text-column sentence --features

A fingerprint folder (or its Hub dataset repo) is accepted wherever a model is."""

GRID_EPILOG = """\
examples:
  hf-cka grid org/a org/b org/c org/d --output four-models
  hf-cka grid ./base ./ft-1 me/published-fingerprint --num-samples 512

Each model is loaded, run once and freed before the next; every pair is then combined. The
folder holds grid.json, one result folder per pair and grid.png (models clustered by the mean
best-layer CKA)."""

PLOT_EPILOG = """\
examples:
  hf-cka plot cka-results/r20261128T174455Z_3f9a
  hf-cka plot cka-results/r20261128T174455Z_3f9a --annot --output bert-cka.png
  hf-cka plot cka-results/d20261128T180102Z_9c1e              # a drift folder"""

PUSH_EPILOG = """\
examples:
  hf-cka push cka-results/r20261128T174455Z_3f9a me/bert-sst2-cka
  hf-cka push cka-results/d20261128T180102Z_9c1e me/finetune-drift --private
  hf-cka push cka-fingerprints/google-bert--bert-base-uncased me/bert-fp

The dataset gets one parquet file per run (configs "scores" and "runs"), the heatmap and a
dataset card; pushing again to the same repo adds runs. Load a run back with
hf_cka.CKAResult.from_hub(REPO_ID) or datasets.load_dataset(REPO_ID, "scores"). A fingerprint
folder is pushed as it is (and replaces the repo's fingerprint)."""
