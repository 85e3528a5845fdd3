r"""The paper's algorithm in PyTorch over whole models, as the official script
runs it (:func:`experiments.torch_reference.recover_models`): a process of
its own, so that ``experiments.bench_recover`` times it from its start.

  python -m experiments.reference_torch --models=A,B,C --output=OUT.safetensors

Needs torch (``pip install .[reference]``).
"""

import time

from absl import app
from absl import flags

from experiments import torch_reference

_MODELS = flags.DEFINE_list("models", [], "Fine-tuned models (safetensors "
                            "files or HF directories).")
_OUTPUT = flags.DEFINE_string("output", None, "Where the recovered layers go "
                              "(.safetensors).")
_RANK = flags.DEFINE_integer("rank", 16, "LoRA rank (the scheduler's end "
                             "rank).")
_STEPS = flags.DEFINE_integer("steps", 300, "Steps per layer.")
_SEED = flags.DEFINE_integer("seed", 0, "torch seed.")
_GROUND_TRUTH = flags.DEFINE_string("ground_truth", None, "Base model: print "
                                    "each step's W-Error, as the official "
                                    "script does.")


def main(argv):
  del argv
  start = time.perf_counter()
  layers = torch_reference.recover_models(
      _MODELS.value, _RANK.value, _STEPS.value, _OUTPUT.value, _SEED.value,
      _GROUND_TRUTH.value)
  print(f"reference: {layers} layers in {time.perf_counter() - start:.1f}s "
        f"-> {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
