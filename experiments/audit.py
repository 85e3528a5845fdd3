r"""A defender's audit: how many of these fine-tunes can I publish?

A publisher who holds the base model and plans to release LoRA fine-tunes of
it asks how well an attacker recovers the base from every number of released
models (:mod:`detune_jax.audit`: for n = 2..N, the first n models or several
random subsets of size n, every fine-tuned layer recovered with each solver
and scored against the true base, the best solver per layer counting). The
base *leaks* at the smallest n whose overall W-Error is at or below the
threshold.

Usage:

  python -m experiments.audit --base=BASE_DIR --models=A,B,C,D \
      --out=/tmp/audit [--threshold=-10] [--rank=16] [--subsets=1]

Writes ``audit.json`` (per n, per layer and per solver; strict JSON, a
non-finite figure is ``null``), ``audit.png`` and prints a table. Inputs are
read as stored (a bf16 release is solved as bf16, with the dtype-aware
refinement), or with ``--release_dtype=bfloat16`` (or ``float16``) each
rounded to that dtype first, as saving them in it would: a publisher who
holds float32 weights and plans to ship them in bf16 audits what ships.
With ``--from_rounded_base`` the fine-tunes are instead rebuilt on the base
as rounded (``round(round(W) + W'_i - W)``), as fine-tunes made from a base
published in that dtype are: then the base lies on the grid of the
releases and the attacker's grid step applies. For low-precision releases
the audit also gives the share of the base's weights that come back bit for
bit (per solver, and for the best solver of each layer). The reader and
checks are those of ``experiments.recover``: HF directories (sharded ones
too) or single ``.safetensors`` files; the LoRA
layers are the float tensors of 2+ axes that differ among the models (conv
kernels and 3-D tensors are solved as ``[d, prod(rest)]`` matrices). Bad
input (fewer than 2 models, missing, pickle, truncated or corrupt files,
mismatched names, shapes or dtypes, non-finite values, a rank too large for a
layer, ``--out`` an existing file) ends with exit status 2 and one line
``error: FILE: tensor 'NAME': what is wrong``.
"""

from __future__ import annotations

import logging as py_logging
import os
import sys

from absl import app, flags

from detune_jax import audit
from detune_jax import timings
from detune_jax.io.errors import BadInputError, parse_flags

_BASE = flags.DEFINE_string("base", None, "The base model (HF dir or "
                            ".safetensors).")
_MODELS = flags.DEFINE_list("models", None, "The fine-tunes to be released, "
                            "in order.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: no "
                           "files).")
_THRESHOLD = flags.DEFINE_float(
    "threshold", None, "Leak threshold on the W-Error; default: 3 decades "
    "below the released models' own W-Error (LoRA-FT), i.e. 1000x closer to "
    "the base.")
_RANK = flags.DEFINE_integer("rank", 16, "LoRA rank the attacker assumes.")
_STEPS = flags.DEFINE_integer("steps", 300, "Steps of the iterative solvers.")
_SUBSETS = flags.DEFINE_integer("subsets", 1, "Subsets of each size n (1: the "
                                "first n).")
_SOLVERS = flags.DEFINE_list("solvers", list(audit.DEFAULT_SOLVERS),
                             "Solvers the attacker may use.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the subsets and solvers.")
_RELEASE_DTYPE = flags.DEFINE_enum(
    "release_dtype", "stored", list(audit.RELEASE_DTYPES), "Audit the models "
    "as stored, or each (base and fine-tunes) rounded to this dtype, as "
    "saving it in this dtype would.")
_FROM_ROUNDED_BASE = flags.DEFINE_bool(
    "from_rounded_base", False, "With --release_dtype: rebuild each "
    "fine-tune on the base as rounded (round(round(W) + W'_i - W)), as "
    "fine-tunes made from a base published in that dtype are.")


def _fail(message: str) -> None:
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  sys.exit(2)


def _report(result) -> None:
  print(audit.table(result))
  leak = result["leak_n"]
  print(f"released models' own W-Error (LoRA-FT): {result['lora_ft']:.2f}; "
        f"threshold {result['threshold']:.2f}")
  print("the base leaks from n = " + str(leak) if leak else
        f"the base does not leak with up to {len(result['models'])} models")
  if result["low_precision"]:
    print("in brackets: the share of the base's weights recovered bit for "
          "bit" + ("" if result["release_dtype"] == "stored" else
                   f" from the {result['release_dtype']} release"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # JAX logs its backend search at INFO; bad input must stay one line.
  py_logging.getLogger("jax").setLevel(py_logging.WARNING)
  # As recover: a second audit of the same shapes loads its programs.
  timings.enable_compilation_cache()
  out = _OUT.value
  try:
    if not _BASE.value:
      raise BadInputError("--base", "is required")
    if out and os.path.exists(out) and not os.path.isdir(out):
      raise BadInputError(out, "output path exists and is not a directory")
    result = audit.audit(
        _BASE.value, _MODELS.value or [], rank=_RANK.value, steps=_STEPS.value,
        subsets=_SUBSETS.value, solvers=_SOLVERS.value,
        threshold=_THRESHOLD.value, seed=_SEED.value,
        release_dtype=_RELEASE_DTYPE.value,
        from_rounded_base=_FROM_ROUNDED_BASE.value)
  except BadInputError as e:
    _fail(str(e))
  _report(result)
  if out:
    try:
      audit.write_json(result, out)
      audit.plot(result, os.path.join(out, "audit.png"))
    except OSError as e:
      _fail(f"{out}: cannot write the results ({e.strerror or e})")
    print(f"wrote {out}/audit.json and audit.png")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
