r"""Does Spectral DeTuning stall on real layers, and does the rank
scheduler's plateau threshold decide it?

    python -m research.plateau_threshold [--thresholds=0,1e-4,1e-3,1e-2]
        [--subsets=10] [--torch]

On the shipped MiniLM bench (the 15 rank-16 fine-tunes, the 24 attention
layers), for random subsets of n=5 as experiments.reproduce draws them, runs
detune_jax's spectral_detuning (300 steps) with each plateau threshold of
the rank scheduler and prints the mean W-Error, the worst layer's and the
number of layers left above W-Error -15 (stalled). With --torch, every layer
stalled at the first threshold is also solved by the paper's algorithm
(experiments/torch_reference.py, torch seeds 0-2), to tell the algorithm's
basins from this implementation's.
"""

import os
import time

import numpy as np
from absl import app, flags

from detune_jax import metrics
from detune_jax.eval import bench_study as study
from detune_jax.lora import bench
from detune_jax.solvers import registry
from detune_jax.solvers.schedule import RankSchedule

_THRESHOLDS = flags.DEFINE_list("thresholds", ["0", "1e-4", "1e-3", "1e-2"],
                                "Plateau thresholds of the rank scheduler.")
_SUBSETS = flags.DEFINE_integer("subsets", 10, "Random subsets of n.")
_N = flags.DEFINE_integer("n", 5, "Fine-tunes per subset.")
_TORCH = flags.DEFINE_bool("torch", False, "Also run the paper's algorithm "
                           "on the layers stalled at the first threshold.")
STALLED = -15.0


def main(argv):
  del argv
  d = bench.bench_dir()
  record = bench.read_bench(d)
  b = study.load_bench([os.path.join(d, a["name"])
                        for a in record["adapters"]], bench.base_dir())
  S = b.stacks[(384, 384)]
  W = np.stack([b.base[n] for n in b.names])
  subsets = study.random_subsets(len(b.adapters), _N.value, _SUBSETS.value)
  stalled_first = []
  print("| threshold | mean W-Error | worst layer | stalled layers | "
        "median s per subset |\n|---|---|---|---|---|")
  for k, th in enumerate(float(t) for t in _THRESHOLDS.value):
    schedule = RankSchedule(threshold=th)
    times, means, worst, stalled = [], [], [], 0
    for idx in subsets:
      t0 = time.time()
      out, _ = registry.solve(S[:, idx], 16, solver="spectral_detuning",
                              steps=300, schedule=schedule)
      out = np.asarray(out)
      times.append(time.time() - t0)
      e = np.asarray(metrics.layer_w_errors(out, W))
      means.append(e.mean())
      worst.append(e.max())
      stalled += int((e > STALLED).sum())
      if k == 0:
        stalled_first += [(idx, l, float(e[l]))
                          for l in np.nonzero(e > STALLED)[0]]
    print(f"| {th:g} | {np.mean(means):.2f} | {np.max(worst):.2f} | "
          f"{stalled} of {W.shape[0] * len(subsets)} | "
          f"{np.median(times):.1f} |", flush=True)
  if _TORCH.value:
    import torch  # pylint: disable=g-import-not-at-top
    from experiments import torch_reference  # pylint: disable=g-import-not-at-top
    print("\nlayers stalled at threshold "
          f"{_THRESHOLDS.value[0]}: W-Error, and the paper's algorithm's")
    for idx, l, e in stalled_first:
      got = []
      for seed in (0, 1, 2):
        torch.manual_seed(seed)
        Wt = torch_reference.spectral_detuning(
            torch.from_numpy(S[l, idx].copy()), 16, 300)[0]
        got.append(float(metrics.layer_w_error(np.asarray(Wt), W[l])))
      print(f"  {idx} {b.names[l]}: {e:.2f}; torch seeds 0-2: " +
            ", ".join(f"{g:.2f}" for g in got), flush=True)


if __name__ == "__main__":
  app.run(main)
