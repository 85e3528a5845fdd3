r"""Recovers the pre-fine-tuning model from n LoRA fine-tuned models.

    python -m experiments.recover --models=ft_0,ft_1,ft_2 --output_dir=OUT
    python -m experiments.recover --lowra_bench=PATH --subset=vit \
        --n_loras=5 --output_dir=OUT --rank=16
    python -m experiments.recover            # the embedded demo (./detune_demo)

Writes OUT/model.safetensors (sharded like the input), OUT/report.json and an
orbax checkpoint (OUT/checkpoint) for resuming, and prints where its time
went. Compiled programs are kept in ~/.cache/detune_jax/jax_cache (see
--compilation_cache). Bad input exits with status 2 and one line on stderr.
See detune_jax.pipeline for the details.
"""

import time

_PROCESS_START = time.time()   # before the imports, which a run waits for

import logging as py_logging  # pylint: disable=g-import-not-at-top,g-bad-import-order
import os
import signal
import sys

from absl import app, flags

from detune_jax import pipeline, timings
from detune_jax.io.errors import BadInputError, parse_flags

_MODELS = flags.DEFINE_list("models", [], "Fine-tuned models: safetensors "
                            "files or HF directories (comma separated).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Output directory.")
_RANK = flags.DEFINE_string("rank", "auto", "LoRA rank: an int, or 'auto' to "
                            "estimate it per layer and per LoRA.")
_AMBIGUOUS = flags.DEFINE_string(
    "ambiguous_rank", "consistent", "With --rank=auto, what to do when a "
    "layer's rank estimate is ambiguous: consistent (keep it if the pairwise "
    "ranks of 3+ models agree with it exactly, else exit 2), error (exit 2), "
    "guess, mean (average the layer), or an int rank.")
_STEPS = flags.DEFINE_integer("steps", 300, "Solver steps per layer.")
_SEED = flags.DEFINE_integer("seed", 0, "Solver seed.")
_SOLVER = flags.DEFINE_string(
    "solver", "auto", "Layer solver, a name in "
    "detune_jax.solvers.registry.SOLVERS: auto (closed form for n >= 3, "
    "polished by one step, refined where ill-posed; spectral_detuning "
    "otherwise), spectral_detuning, "
    "closed_form, closed_form+refine, mean_lora.")
_DTYPE_AWARE = flags.DEFINE_bool(
    "dtype_aware", True, "For layers released in bfloat16/float16, refine the "
    "recovery on that dtype's grid (--nodtype_aware turns it off).")
_EXPLAIN_STEPS = flags.DEFINE_integer(
    "explain_steps", 0, "0, or check each bf16/fp16 layer's output against "
    "the releases, with no ground truth: look (at most this many "
    "projections, e.g. 2000) for rank-r updates with which the output "
    "reproduces every released value bit for bit. Found, the releases are "
    "exactly consistent with the output, and every weight it gets wrong is "
    "one they leave open. The report gives per layer 'explained' and "
    "'reproduced_fraction' (detune_jax.explain_releases).", lower_bound=0)
_MAX_MEMORY_GB = flags.DEFINE_float("max_memory_gb", 4.0, "Memory budget of "
                                    "one batch of same-shape layers.")
_GROUND_TRUTH = flags.DEFINE_string("ground_truth", None, "True base model, "
                                    "for evaluation only.")
_PLOTS = flags.DEFINE_bool("plots", False, "Write PNG plots to output_dir.")
_LOWRA = flags.DEFINE_string("lowra_bench", None, "Local copy of the LoWRA "
                             "Bench dataset (parquet file or directory).")
_SUBSET = flags.DEFINE_string("subset", None, "LoWRA Bench subset, e.g. vit.")
_N_LORAS = flags.DEFINE_integer("n_loras", 5, "LoWRA Bench: use LoRAs "
                                "0..n_loras-1.")
_LORA_IDS = flags.DEFINE_list("lora_ids", [], "LoWRA Bench: LoRA indices to "
                              "use instead of the first n_loras.")
_DEMO = flags.DEFINE_bool("demo", False, "Run the embedded example (also the "
                          "default when neither --models nor --lowra_bench "
                          "is given; an empty --models= is an error).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-"
                                   "process: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Multi-process: "
                                      "number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "Multi-process: this "
                                   "process's index.")
_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "Folder of JAX's persistent compilation "
    "cache, so that a second run of the same shapes skips compiling "
    "(default: $JAX_COMPILATION_CACHE_DIR, else "
    "~/.cache/detune_jax/jax_cache; '' turns it off).")
# Where the embedded example goes without --output_dir.
DEMO_DIR = "detune_demo"

# Tests of resuming: kill this process (SIGKILL) once this many layer
# groups are checkpointed. An environment variable, not a flag: users never
# need it, and --help lists what users need.
KILL_AFTER_GROUPS_ENV = "DETUNE_JAX_KILL_AFTER_GROUPS"


def _kill_after(k):
  def hook(count):
    if count >= k:
      os.kill(os.getpid(), signal.SIGKILL)
  return hook


def _summary(report, startup):
  print(f"recovered {report['n_solved']} fine-tuned layers from "
        f"{report['n_models']} models in {report['seconds']:.1f}s "
        f"-> {os.path.join(report['output_dir'], report['output_files'][0])}")
  t = report.get("timings")
  if t:
    print(f"time (s): startup {startup:.1f}  " +
          "  ".join(f"{k} {v:.1f}" for k, v in t.items()))
  if report.get("w_error") is not None:
    print(f"W-Error: {report['solver']} {report['w_error']:.2f}  "
          f"Mean-LoRA {report['mean_lora_w_error']:.2f}  bit-exact weights "
          f"{100 * report['bit_exact_fraction']:.1f}%")
    print(f"  (W-Error: log10 of the mean squared error to the true base, "
          f"lower is better; {report['solver']}: the solver used; Mean-LoRA: "
          f"the fine-tunes' average, the naive baseline; bit-exact: weights "
          f"recovered bit for bit)")
  ex = report.get("explain")
  if ex and not ex["layers"]:
    print("explained by the releases: no bf16/fp16 layer to check")
  elif ex:
    print(f"explained by the releases: {ex['explained_layers']} of "
          f"{ex['layers']} bf16/fp16 layers ({ex['steps']} projections at "
          f"most; released values reproduced: "
          f"{100 * ex['reproduced_fraction']:.3f}%)")
    missed = [l["name"] for l in report["layers"]
              if l.get("explained") is False]
    if missed:
      more = f" and {len(missed) - 5} more" if len(missed) > 5 else ""
      print(f"not explained (no witness within {ex['steps']} projections; "
            "the output may get weights wrong that the releases "
            "determine): " + ", ".join(missed[:5]) + more)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # JAX logs its backend search at INFO; bad input must stay one line.
  py_logging.getLogger("jax").setLevel(py_logging.WARNING)
  timings.enable_compilation_cache(_CACHE.value)
  startup = time.time() - _PROCESS_START
  try:
    pipeline.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                    _PROCESS_ID.value)
    kill_after = int(os.environ.get(KILL_AFTER_GROUPS_ENV) or 0)
    hook = _kill_after(kill_after) if kill_after > 0 else None
    options = dict(rank=_RANK.value, steps=_STEPS.value, seed=_SEED.value,
                   solver=_SOLVER.value, max_memory_gb=_MAX_MEMORY_GB.value,
                   ambiguous_rank=_AMBIGUOUS.value, plots=_PLOTS.value,
                   dtype_aware=_DTYPE_AWARE.value,
                   explain_steps=_EXPLAIN_STEPS.value)
    # An empty entry (two commas, or one at an end) is bad input, as is a
    # --models or --lowra_bench given with nothing in it (not the demo).
    models = list(_MODELS.value)
    if _MODELS.present and not any(m.strip() for m in models):
      raise BadInputError("--models", "is empty: give the fine-tuned models "
                          "(files or directories), comma separated")
    if any(not m.strip() for m in models):
      raise BadInputError("--models", f"has an empty entry ({','.join(models)}"
                          "): give each model once, comma separated")
    if _LOWRA.present and not (_LOWRA.value or "").strip():
      raise BadInputError("--lowra_bench", "is empty: give the path of a "
                          "local LoWRA Bench copy")
    if _DEMO.value or not (_MODELS.present or _LOWRA.present):
      out_dir, work_dir = _OUTPUT_DIR.value, None
      if not out_dir:
        # The example's models and recovery go to a folder the README
        # names, in the working directory, not to a temporary one.
        work_dir = os.path.abspath(DEMO_DIR)
        out_dir = os.path.join(work_dir, "recovered")
      report = pipeline.demo(out_dir, work_dir=work_dir, steps=_STEPS.value,
                             seed=_SEED.value, plots=_PLOTS.value,
                             max_memory_gb=_MAX_MEMORY_GB.value,
                             solver=_SOLVER.value,
                             dtype_aware=_DTYPE_AWARE.value,
                             explain_steps=_EXPLAIN_STEPS.value)
      _summary(report, startup)
      return 0
    try:
      lora_ids = tuple(int(i) for i in _LORA_IDS.value)
    except ValueError:
      raise BadInputError("--lora_ids", f"not integers: {_LORA_IDS.value}")
    config = pipeline.RecoverConfig(
        models=tuple(models), output_dir=_OUTPUT_DIR.value or "",
        ground_truth=_GROUND_TRUTH.value, lowra_bench=_LOWRA.value,
        subset=_SUBSET.value, n_loras=_N_LORAS.value, lora_ids=lora_ids,
        **options)
    report = pipeline.recover(config, on_group_done=hook)
  except BadInputError as e:
    sys.stderr.write(f"error: {e}\n")
    sys.stderr.flush()
    sys.exit(2)
  if _PROCESS_ID.value == 0:
    _summary(report, startup)
  if _NUM_PROCESSES.value == 1:
    _exit_now()
  return 0


def _exit_now():
  """Ends the process: every file is written and closed by now. Skips the
  interpreter's teardown, where destroying JAX's runtime alone takes about
  0.3 s (a tenth of a warm run on a small model). One-process runs only: a
  multi-process run shuts its JAX client down properly."""
  if __name__ != "__main__":
    return
  py_logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
