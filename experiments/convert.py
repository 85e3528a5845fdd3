r"""Converts a model checkpoint between HF safetensors and orbax, bit for bit,
and imports llama.cpp GGUF files.

    python -m experiments.convert --from=MODEL_DIR_OR.safetensors --to=ORBAX_DIR
    python -m experiments.convert --from=ORBAX_DIR --to=HF_DIR
    python -m experiments.convert --from=ORBAX_DIR --to=model.safetensors
    python -m experiments.convert --from=MODEL.gguf --to=HF_DIR

The form of ``--to`` is a ``.safetensors`` file when it ends so; otherwise an
orbax checkpoint when ``--from`` is not one, an HF directory when it is
(``--to_format`` says it outright). The files beside the weights
(``config.json``, tokenizer files, ...) travel with them into directories.
Every tensor keeps its dtype, shape and bytes. ``--to`` must not exist;
a failed conversion leaves nothing behind. Bad input exits with status 2 and
one line.

A GGUF file (a Llama-architecture model, as llama.cpp runs it) becomes an HF
Llama directory: every tensor dequantised to float32 under HF names (q and k
un-permuted from llama.cpp's rope layout), ``config.json``,
``generation_config.json``, and ``tokenizer.json`` plus
``tokenizer_config.json`` (with the chat template) rebuilt from the file's
vocabulary; see :mod:`detune_jax.io.gguf_import` for what is supported. A
tokenizer that cannot be rebuilt is a warning on stderr, not an error. What
HF's Llama cannot express (other architectures, rope scaling, experts) is
refused.
"""

import logging as py_logging
import sys

from absl import app, flags

from detune_jax.io import checkpoints, gguf_import
from detune_jax.io.errors import BadInputError, parse_flags

_FROM = flags.DEFINE_string("from", None, "Source: an HF model directory, a "
                            ".safetensors file, an orbax checkpoint or a "
                            ".gguf file.")
_TO = flags.DEFINE_string("to", None, "Destination (must not exist).")
_TO_FORMAT = flags.DEFINE_enum("to_format", None,
                               ["orbax", "hf", "safetensors"],
                               "Form of --to (default: see above).")

flags.mark_flags_as_required(["from", "to"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  py_logging.getLogger("jax").setLevel(py_logging.WARNING)
  src, dest = _FROM.value, _TO.value
  if gguf_import.is_gguf(src):
    return _import_gguf(src, dest)
  form = _TO_FORMAT.value or checkpoints.default_form(src, dest)
  try:
    ckpt = checkpoints.read_checkpoint(src)
    checkpoints.write_checkpoint(ckpt, dest, form)
  except BadInputError as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  print(f"wrote {len(ckpt.tensors)} tensors to {dest} ({form})")
  return 0


def _import_gguf(src: str, dest: str) -> int:
  try:
    if _TO_FORMAT.value not in (None, "hf"):
      raise BadInputError("--to_format", f"{_TO_FORMAT.value!r}: a GGUF file "
                          "converts to an HF directory only")
    result = gguf_import.import_gguf(src, dest)
  except BadInputError as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  for line in result.warnings:
    sys.stderr.write(f"warning: {line}\n")
  print(f"wrote {result.tensors} float32 tensors to {dest} (hf, from GGUF)")
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
