r"""Merges a PEFT LoRA adapter into its base model (to build test sets).

    python -m experiments.merge_peft --base=BASE --adapter=ADAPTER_DIR \
        --output_dir=FT_0

BASE is a safetensors file or HF directory; ADAPTER_DIR holds
adapter_config.json and adapter_model.safetensors. The output is shaped like
the base (sharded when it is). Nothing is overwritten: an OUTPUT_DIR that is
the base's own directory, an existing file, or a directory already holding
model files is bad input. Bad input exits with status 2 and one line.
"""

import logging as py_logging
import sys

from absl import app, flags

from detune_jax.io.errors import BadInputError, parse_flags
from detune_jax.io.peft import merge_adapter

_BASE = flags.DEFINE_string("base", None, "Base model (file or directory).")
_ADAPTER = flags.DEFINE_string("adapter", None, "PEFT adapter directory.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Output directory.")

flags.mark_flags_as_required(["base", "adapter", "output_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  py_logging.getLogger("jax").setLevel(py_logging.WARNING)
  try:
    changed = merge_adapter(_BASE.value, _ADAPTER.value, _OUTPUT_DIR.value)
  except BadInputError as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  print(f"merged {len(changed)} tensors into {_OUTPUT_DIR.value}")
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
