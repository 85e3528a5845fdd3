r"""Writes LoRA fine-tunes of one base model as a LoWRA Bench-layout dataset.

The official Spectral DeTuning script reads LoWRA Bench (through HF
``datasets``), as does ``experiments.recover --lowra_bench``. This writes the
same layout from merged fine-tunes
so that both can run on real fine-tunes side by side
(:func:`detune_jax.io.lowra_writer.write_lowra_bench`):

  python -m experiments.lowra_export --base=BASE --models=FT0,FT1,... \
      --rank=16 --output_dir=OUT

Each fine-tuned layer's update ``W'_i - W`` is factored by its SVD at
``--rank`` (``B = U S``, ``A = V^T``, ``alpha = rank``); the update must have
at most that rank (the largest dropped singular value is checked against
``--max_dropped``, relative to the first). ``OUT/README.md`` declares the
subset (``--subset``; the official script accepts only its own subset names,
so the default is ``vit`` whatever the model) for ``datasets.load_dataset``.
"""

import sys

from absl import app, flags

from detune_jax.io.lowra_writer import write_lowra_bench

_BASE = flags.DEFINE_string("base", None, "The base model (file or HF "
                            "directory).")
_MODELS = flags.DEFINE_list("models", [], "The fine-tuned models.")
_RANK = flags.DEFINE_integer("rank", 16, "LoRA rank of every fine-tune.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the dataset "
                                  "goes.")
_SUBSET = flags.DEFINE_string("subset", "vit", "Subset (config) name.")
_LAYER_MODEL = flags.DEFINE_string("layer_model", "minilm", "The layer_model "
                                   "column.")
_MAX_DROPPED = flags.DEFINE_float("max_dropped", 1e-4, "Largest singular "
                                  "value allowed past the rank, relative to "
                                  "the first.")


def main(argv):
  del argv
  try:
    n = write_lowra_bench(_BASE.value, _MODELS.value, _RANK.value,
                          _OUTPUT_DIR.value, _SUBSET.value, _LAYER_MODEL.value,
                          _MAX_DROPPED.value)
  except ValueError as e:  # an update of rank above --rank
    sys.exit(str(e))
  print(f"{n} layers x {len(_MODELS.value)} LoRAs -> {_OUTPUT_DIR.value}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["base", "output_dir"])
  app.run(main)
