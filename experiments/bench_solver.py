r"""Benchmark: detune_jax against the paper's Algorithm 2 in PyTorch.

Runs both methods on the same seeded synthetic stacks ``W'_i = W + B_i A_i``
and prints, per case and method, the wall seconds (compilation excluded for
detune_jax and reported apart), seconds per step, the final W-Error, the
time-to-accuracy (wall time until the W-Error of the case, the mean over its
layers of ``log10 MSE``, first reaches the reference's final W-Error) and the
reference/detune_jax ratios; for the Mistral-shaped case each method runs in a
fresh subprocess and its peak resident memory, less what the process held
right after its imports, is compared with the bytes of the float32 input
stack.

  python -m experiments.bench_solver --cases=vit,sd,mistral --repeats=3

The ``minilm`` case runs both methods on real LoRA fine-tunes instead
(the shipped bench's rank-16 adapters, merged: the 24 attention layers of
all-MiniLM-L6-v2, rank 16), n = 5 and 8, and prints each layer's W-Error
beside the reference's: real LoRAs' steep spectra catch what Gaussian
stacks do not (a solver that stalls on one layer while the mean looks fine).

  python -m experiments.bench_solver --cases=minilm

The reference is ``experiments/torch_reference.py`` (torch is an optional
extra: ``pip install .[reference]``); without torch only detune_jax runs and
the output says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Sequence, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from detune_jax import memory, metrics, model_stacks, parallel
from detune_jax.solvers.spectral_detuning import precompile
from detune_jax.synthetic import lora_stack

FLAGS = flags.FLAGS
flags.DEFINE_list("cases", ["vit", "sd", "mistral"], "Cases to run: vit, "
                  "sd, mistral (synthetic), minilm (real fine-tunes).")
flags.DEFINE_integer("repeats", 3, "Timed repeats per case and method "
                     "(medians are reported).")
flags.DEFINE_integer("layers", 0, "If > 0, at most this many layers of each "
                     "shape (a quick run).")
flags.DEFINE_integer("steps", 300, "Optimisation steps (ViT and SD cases).")
flags.DEFINE_bool("mistral_cache", True, "Mistral case: also run "
                  "detune_jax with a warm persistent compilation cache.")
flags.DEFINE_integer("mistral_steps", 30, "Optimisation steps of the "
                     "Mistral-shaped case (memory does not depend on it).")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic stacks.")
flags.DEFINE_string("svd", "subspace", "detune_jax M-step method.")
flags.DEFINE_integer("chunk", 0, "detune_jax layers per solver call "
                     "(0: all layers of a shape at once).")
flags.DEFINE_bool("reference", True, "Also run the PyTorch reference.")
flags.DEFINE_integer("ref_repeats", 0, "Timed repeats of the reference "
                     "(0: same as --repeats).")
flags.DEFINE_string("json_out", None, "Write all figures to this JSON file.")
flags.DEFINE_string("minilm_dir", model_stacks.MINILM_DIR,
                    "A folder of base/ and fine-tunes ft*/ (default: the shipped MiniLM bench's rank-16 adapters, merged there on first use).")
flags.DEFINE_list("minilm_ns", ["5", "8"], "minilm case: numbers of "
                  "fine-tunes (the first n of --minilm_dir).")
# Internal: one method of the Mistral case in a fresh process.
flags.DEFINE_string("_memory_child", None, "internal")

# name -> (list of (shape, layer count), n, rank)
CASES = {
    "vit": ([((768, 768), 24)], 5, 16),
    "sd": ([((320, 320), 2), ((640, 640), 2), ((1280, 1280), 2),
            ((320, 768), 1), ((640, 768), 1), ((1280, 768), 1)], 5, 32),
    "mistral": ([((4096, 4096), 1)], 12, 64),
}
# Real fine-tunes: every attention layer of all-MiniLM-L6-v2 with its rank-16
# LoRAs, per layer against the reference (see run_real_case).
REAL_CASES = {"minilm": 16}
SCALE = 0.02


def make_case(name: str, seed: int, max_layers: int = 0):
  """Groups of ``(W [L, d, k], W' [L, n, d, k])`` for a case, seeded
  (:func:`detune_jax.synthetic.lora_stack`: each stack written one LoRA at
  a time into its own buffer, so that making the Mistral-shaped one takes
  its size plus one ``[L, d, k]`` temporary)."""
  groups, n, r = CASES[name]
  out = []
  for g, ((d, k), count) in enumerate(groups):
    L = min(count, max_layers) if max_layers > 0 else count
    out.append(lora_stack(seed * 1000 + g, d, k, n, r, layers=L, scale=SCALE))
  return out, n, r


def _case_trace(traces: List[np.ndarray]) -> np.ndarray:
  """Per-step W-Error of a case: mean over all its layers (Eq. 8)."""
  return np.mean(np.concatenate(traces, axis=0), axis=0)


def _first_reach(trace: np.ndarray, target: float):
  hit = np.nonzero(trace <= target)[0]
  return None if hit.size == 0 else int(hit[0])


# ----------------------------------------------------------------- detune_jax

def _solve_groups(groups, r, steps, W_true=False, stop_after=None):
  """Solves every group in chunks; returns (per-group W, diags, seconds)."""
  Ws, diags, seconds = [], [], 0.0
  for W, Wp in groups:
    L = Wp.shape[0]
    chunk = FLAGS.chunk if FLAGS.chunk > 0 else L
    parts = []
    for s in range(0, L, chunk):
      kw = dict(steps=steps, svd=FLAGS.svd)
      if stop_after is not None:
        kw["stop_after"] = stop_after
      if W_true:
        kw["W_true"] = W[s:s + chunk]
      start = time.perf_counter()
      out = parallel.solve_layers(Wp[s:s + chunk], r, **kw)
      jax.block_until_ready(out)
      seconds += time.perf_counter() - start
      parts.append(out[0])
      diags.append(out[1])
    Ws.append(jnp.concatenate(parts, axis=0))
  return Ws, diags, seconds


def _case_w_error(Ws, groups) -> float:
  """W-Error of a case: mean over all its layers of log10 MSE."""
  errs = [np.log10(np.maximum(np.mean(np.square(
      np.asarray(got) - np.asarray(W)), axis=(1, 2)), 1e-30))
          for got, (W, _) in zip(Ws, groups)]
  return float(np.mean(np.concatenate(errs)))


def matmul_floor(groups, q, reps: int = 20) -> Tuple[float, float]:
  """Seconds of a step's unavoidable products at working width ``q``.

  Returns ``(one, two)``. ``two``: a full block power step of the M-step
  touches every ``[d, k]`` matrix of the stack twice, ``D_i @ V_i`` and
  ``(D_i V_i)^T @ D_i`` with ``q`` columns (what a two-sided subspace step
  cannot skip). ``one``: the mean of the two products timed alone, one pass
  over the stack: what each of detune_jax's alternating steps cannot skip.
  Each is a jitted batched call for all layers of the case (median of
  ``reps`` calls), on the same machine and run.
  """
  one = two = 0.0
  for _, Wp in groups:
    L, n, d, k = Wp.shape
    V = jnp.ones((L, n, k, q), jnp.float32) / np.sqrt(k)
    Q = jnp.ones((L, n, d, q), jnp.float32) / np.sqrt(d)
    right = jax.jit(lambda D, V: jnp.einsum("lndk,lnkq->lndq", D, V))
    left = jax.jit(lambda D, Q: jnp.einsum("lndq,lndk->lnqk", Q, D))
    both = jax.jit(lambda D, V: jnp.einsum(
        "lndq,lndk->lnqk", jnp.einsum("lndk,lnkq->lndq", D, V), D))
    med = {}
    for name, f, x in (("right", right, V), ("left", left, Q),
                       ("both", both, V)):
      jax.block_until_ready(f(Wp, x))
      times = []
      for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(f(Wp, x))
        times.append(time.perf_counter() - start)
      med[name] = float(np.median(times))
    one += (med["right"] + med["left"]) / 2
    two += med["both"]
  return one, two


def run_floor(groups, rank_trace: np.ndarray, reps: int = 20) -> Dict:
  """The matmul floor of a whole run, weighted by its working ranks.

  ``rank_trace``: ``[steps]`` scheduler rank of each step (the solver works
  at that width). Returns the floors per step at each width and the floors
  of the run, ``sum_t floor(q_t)``, for one and for two passes per step;
  ``loop_s``: the one-pass floor of steps 2 to the last (what the loop
  adds to a run stopped after its first step).
  """
  widths, counts = np.unique(rank_trace, return_counts=True)
  per_q = {int(q): matmul_floor(groups, int(q), reps) for q in widths}
  one = float(sum(per_q[int(q)][0] * c for q, c in zip(widths, counts)))
  two = float(sum(per_q[int(q)][1] * c for q, c in zip(widths, counts)))
  loop = one - per_q[int(rank_trace[0])][0]
  return dict(per_q=per_q, run_s=one, run_two_s=two, loop_s=loop)


def run_detune_jax(groups, r, steps) -> Dict:
  """Compiles, records the W-Error trace once, then times ``repeats`` runs."""
  start = time.perf_counter()
  _solve_groups(groups, r, steps)                              # compiles
  compile_s = time.perf_counter() - start
  _, diags, _ = _solve_groups(groups, r, steps, W_true=True)
  trace = _case_trace([np.asarray(d.solver.w_error) for d in diags])
  rank_trace = np.max(np.concatenate(
      [np.asarray(d.rank).reshape(-1, steps, np.asarray(d.rank).shape[-1])
       for d in diags]), axis=(0, 2))
  walls, errs, steps_taken, floors, firsts = [], [], [], [], []
  for _ in range(FLAGS.repeats):
    Ws, diags, sec = _solve_groups(groups, r, steps)
    walls.append(sec)
    errs.append(_case_w_error(Ws, groups))
    steps_taken.append(max(int(np.max(d.steps)) for d in diags))
    # The same run stopped after its first step: everything but the loop
    # (centring, starting subspace, first step, refinement, composition).
    firsts.append(_solve_groups(groups, r, steps, stop_after=1)[2])
    # The floor right after each run: the machine's speed drifts by tens of
    # percent over minutes, so each run is compared with its own floor.
    floors.append(run_floor(groups, rank_trace, reps=10))
  floor = dict(floors[int(np.argsort([f["run_s"] for f in floors])[
      len(floors) // 2])])
  floor["ratio_one"] = [w / f["run_s"] for w, f in zip(walls, floors)]
  floor["ratio_two"] = [w / f["run_two_s"] for w, f in zip(walls, floors)]
  # Per step: the time the loop's steps add (full run less the run stopped
  # after step 1) over their one-pass floor.
  floor["first_step_walls"] = firsts
  floor["ratio_loop"] = [(w - w1) / f["loop_s"] for w, w1, f
                         in zip(walls, firsts, floors)]
  return dict(walls=walls, w_error=float(np.median(errs)), trace=trace,
              steps=int(np.median(steps_taken)), rank_trace=rank_trace,
              compile_and_first_run_s=compile_s, uniform_steps=False,
              floor=floor)


def measure_tta(groups, r, steps, res: Dict, target: float) -> Dict:
  """detune_jax's time-to-accuracy, measured: runs stopped at a step.

  What a run returns when stopped after step ``s`` (``stop_after``, the final
  refinement included) is the recovery at ``s``. The smallest such ``s``
  whose returned W-Error reaches ``target`` is found by bisection below the
  first step where the traced W-Error (the plain W-step, no refinement)
  reaches it; then ``repeats`` runs stopped there are timed and the W-Error
  of what they return is checked against ``target``.
  """
  plain = _first_reach(res["trace"], target + 1e-9)
  if plain is None:
    return dict(tta=None, tta_step=None)

  def reaches(s):
    Ws, _, _ = _solve_groups(groups, r, steps, stop_after=s)
    return _case_w_error(Ws, groups) <= target + 1e-9

  lo, hi = 0, plain + 1              # reaches(hi) holds for the plain trace
  if not reaches(hi):
    hi = steps
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if reaches(mid):
      hi = mid
    else:
      lo = mid
  walls, errs = [], []
  for _ in range(FLAGS.repeats):
    Ws, _, sec = _solve_groups(groups, r, steps, stop_after=hi)
    walls.append(sec)
    errs.append(_case_w_error(Ws, groups))
  return dict(tta=float(np.median(walls)), tta_step=hi, tta_walls=walls,
              tta_plain_step=plain + 1,
              tta_w_error=float(np.median(errs)))


# ------------------------------------------------------------------ reference

def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
    return torch
  except ImportError:
    return None


def run_reference(groups, r, steps) -> Dict:
  import torch  # pylint: disable=g-import-not-at-top
  from experiments import torch_reference  # pylint: disable=g-import-not-at-top
  walls, errs, traces_all, cum_all = [], [], [], []
  for rep in range(FLAGS.ref_repeats or FLAGS.repeats):
    torch.manual_seed(rep)
    traces, cums, final = [], [], []
    for W, Wp in groups:
      W_np, Wp_np = np.asarray(W), np.asarray(Wp)
      for l in range(W_np.shape[0]):
        W_t = torch.from_numpy(W_np[l].copy())
        trace, cum = [], []
        clock = [0.0, time.perf_counter()]

        def callback(step, W_s, W_t=W_t, trace=trace):
          trace.append(float(torch.log10(torch.clamp(
              torch.mean((W_s - W_t) ** 2), min=1e-30))))
        # Per-step cumulative seconds: time the loop between callbacks.
        def timed_callback(step, W_s, callback=callback, cum=cum, clock=clock):
          now = time.perf_counter()
          clock[0] += now - clock[1]
          cum.append(clock[0])
          callback(step, W_s)
          clock[1] = time.perf_counter()
        clock[1] = time.perf_counter()
        _, _, _, _ = torch_reference.spectral_detuning(
            torch.from_numpy(Wp_np[l].copy()), r, steps,
            callback=timed_callback)
        traces.append(np.asarray(trace)[None])
        cums.append(np.asarray(cum))
        final.append(trace[-1])
    cum_case = np.sum(cums, axis=0)       # layers solved one after another
    walls.append(float(cum_case[-1]))
    errs.append(float(np.mean(final)))
    traces_all.append(_case_trace(traces))
    cum_all.append(cum_case)
  best = int(np.argsort(walls)[len(walls) // 2])
  return dict(walls=walls, w_error=float(np.median(errs)),
              trace=traces_all[best], cum=cum_all, errs=errs, steps=steps,
              uniform_steps=False)


def real_case_stacks(n: int):
  """``(names, W_true [L, d, k], W_primes [L, n, d, k])``: the first ``n``
  fine-tunes of ``--minilm_dir``, every fine-tuned layer (one shape)."""
  try:
    base, models = model_stacks.folder_models(FLAGS.minilm_dir, n)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from e
  (names, W, Wp), = model_stacks.layer_stacks(base, models).values()
  return names, W, Wp


def run_real_case(case: str, n: int, steps: int, torch) -> Dict:
  """Per-layer W-Error of detune_jax and of the reference on real fine-tunes.

  Real LoRAs have steep spectra (one direction hundreds of times their
  rank's last) that Gaussian stacks never show; a speed-up that loses those
  directions shows here as a layer far behind the reference. Each layer's
  reference runs with ``torch.manual_seed(0)``.
  """
  r = REAL_CASES[case]
  names, W, Wp = real_case_stacks(n)
  start = time.perf_counter()
  got, _ = parallel.solve_layers(jnp.asarray(Wp), r, steps=steps,
                                 svd=FLAGS.svd)
  jax.block_until_ready(got)
  first_s = time.perf_counter() - start
  start = time.perf_counter()
  got, _ = parallel.solve_layers(jnp.asarray(Wp), r, steps=steps,
                                 svd=FLAGS.svd)
  jax.block_until_ready(got)
  wall = time.perf_counter() - start
  mine = [float(e) for e in metrics.layer_w_errors(got, W)]
  res = dict(n=n, rank=r, names=names, detune_jax=mine, detune_jax_wall=wall,
             detune_jax_first_call_s=first_s)
  if torch is not None:
    from experiments import torch_reference  # pylint: disable=g-import-not-at-top
    ref, ref_wall = [], 0.0
    for l in range(len(names)):
      torch.manual_seed(0)
      W_ref, _, _, sec = torch_reference.spectral_detuning(
          torch.from_numpy(np.ascontiguousarray(Wp[l])), r, steps)
      ref_wall += sec
      ref.append(float(metrics.layer_w_error(W_ref.numpy(), W[l])))
    res.update(reference=ref, reference_wall=ref_wall)
  return res


def print_real_case(case: str, res: Dict) -> None:
  mine, ref = res["detune_jax"], res.get("reference")
  print(f"\n== {case}: {len(mine)} real layers, n={res['n']}, "
        f"r={res['rank']}, {FLAGS.steps} steps")
  header = "  layer" + " " * 44 + "detune_jax"
  print(header + ("  reference  difference" if ref else ""))
  for l, name in enumerate(res["names"]):
    row = f"  {name:50s} {mine[l]:9.2f}"
    if ref:
      row += f"  {ref[l]:9.2f}  {mine[l] - ref[l]:+9.2f}"
    print(row)
  print(f"  detune_jax: worst layer {max(mine):.2f}, mean {np.mean(mine):.2f}, "
        f"wall {res['detune_jax_wall']:.2f} s (first call "
        f"{res['detune_jax_first_call_s']:.2f} s)")
  if ref:
    gap = [a - b for a, b in zip(mine, ref)]
    worst = int(np.argmax(gap))
    print(f"  reference:  worst layer {max(ref):.2f}, mean {np.mean(ref):.2f}, "
          f"wall {res['reference_wall']:.2f} s")
    print(f"  largest gap to the reference: {gap[worst]:+.2f} on "
          f"{res['names'][worst]}; layers more than 0.5 behind it: "
          f"{sum(g > 0.5 for g in gap)}")


# --------------------------------------------------------------- memory case

def _rss_kb(field: str) -> int:
  return memory.resident_bytes(field) // 1024


def memory_child(method: str) -> Dict:
  """One method on the Mistral-shaped layer, in this (fresh) process.

  Two baselines: right after the imports (the target's), and after the
  runtime has started (torch: the same; jax: its CPU client and one tiny
  program, the memory every jax process holds before its first solve).
  detune_jax compiles its solver from the stack's shape before the stack
  is made (:func:`detune_jax.precompile`), as ``experiments.recover`` does.
  """
  if method == "reference":
    import torch  # pylint: disable=g-import-not-at-top
    from experiments import torch_reference  # pylint: disable=g-import-not-at-top
  after_imports = _rss_kb("VmRSS")
  [((d, k), count)], n, r = CASES["mistral"]
  steps = FLAGS.mistral_steps
  if method != "reference":
    jax.block_until_ready(jnp.zeros(()) + 1)
  after_runtime = _rss_kb("VmRSS")
  analysis = {}
  if method != "reference":
    analysis = precompile((count, n, d, k), r, steps, svd=FLAGS.svd)
  after_compile = _rss_kb("VmRSS")
  (W, Wp), = make_case("mistral", FLAGS.seed)[0]     # [1, d, k], [1, n, d, k]
  jax.block_until_ready(Wp)
  # The ground truth is regenerated from the seed after the solve: the
  # solver's peak is measured with the stack alone in memory.
  del W
  after_stack = _rss_kb("VmHWM")
  # Generating the stack compiled small programs: their heap goes back too.
  memory.trim_heap()
  input_bytes = Wp.size * 4
  start = time.perf_counter()
  if method == "reference":
    Wp_t = torch.from_numpy(np.asarray(Wp)[0])  # shares the stack's buffer
    W_rec, _, _, seconds = torch_reference.spectral_detuning(Wp_t, r, steps)
    W_rec = W_rec.numpy()
  else:
    # The stack is handed over: the solver keeps W' - mean in its buffer.
    W_rec, _ = parallel.solve_layers(Wp, r, steps=steps, svd=FLAGS.svd,
                                     donate_input=True)
    del Wp
    W_rec = np.asarray(W_rec[0])
    seconds = time.perf_counter() - start
  peak = _rss_kb("VmHWM")
  W_np = np.asarray(lora_stack(FLAGS.seed * 1000, d, k, 0, r, layers=count,
                               scale=SCALE)[0])[0]
  err = float(np.log10(max(np.mean((W_rec - W_np) ** 2), 1e-30)))
  kib = 1024
  return dict(method=method, seconds=seconds, steps=steps, w_error=err,
              peak_minus_imports_bytes=(peak - after_imports) * kib,
              runtime_bytes=(after_runtime - after_imports) * kib,
              compiled_bytes=(after_compile - after_runtime) * kib,
              stack_peak_minus_imports_bytes=(after_stack - after_imports)
              * kib,
              input_bytes=input_bytes,
              ratio=(peak - after_imports) * kib / input_bytes,
              ratio_after_runtime=(peak - after_runtime) * kib / input_bytes,
              xla_temp_bytes=analysis.get("temp_bytes", 0),
              xla_alias_bytes=analysis.get("alias_bytes", 0),
              cache=bool(os.environ.get("JAX_COMPILATION_CACHE_DIR")))


def run_memory_case(method: str, cache_dir: str = "") -> Dict:
  cmd = [sys.executable, "-m", "experiments.bench_solver",
         f"--_memory_child={method}", f"--seed={FLAGS.seed}",
         f"--mistral_steps={FLAGS.mistral_steps}", f"--svd={FLAGS.svd}"]
  env = dict(os.environ)
  if cache_dir:
    # jax's persistent compilation cache, every program in it.
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                       env=env)
  if out.returncode != 0:
    raise RuntimeError(f"memory child {method} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------- report

def _tta(res: Dict, target: float):
  """Seconds until the case first reaches ``target`` (median over repeats)."""
  s = _first_reach(res["trace"], target + 1e-9)
  if s is None:
    return None, None
  if res["uniform_steps"]:
    # detune_jax's steps all cost the same (it works at the end rank).
    return float(np.median(res["walls"]) / res["steps"] * (s + 1)), s + 1
  return float(np.median([c[s] for c in res["cum"]])), s + 1


def _fmt(x, f="{:.3f}"):
  return "n/a" if x is None else f.format(x)


def run_mistral_case(torch) -> Dict:
  """The Mistral-shaped case, each method in a fresh process; prints it."""
  res = {"detune_jax": run_memory_case("detune_jax")}
  if FLAGS.mistral_cache:
    with tempfile.TemporaryDirectory() as cache_dir:
      run_memory_case("detune_jax", cache_dir)         # fills the cache
      res["detune_jax_cached"] = run_memory_case("detune_jax", cache_dir)
  if torch is not None:
    res["reference"] = run_memory_case("reference")
  print(f"\n== mistral: 1 layer 4096x4096, n=12, r=64, "
        f"{FLAGS.mistral_steps} steps (fresh process per method; "
        f"detune_jax_cached: compiled programs read from jax's "
        f"persistent cache, as on a second run)")
  for m, v in res.items():
    print(f"  {m:17s} wall {v['seconds']:7.2f} s  s/step "
          f"{v['seconds'] / v['steps']:6.3f}  W-Error {v['w_error']:7.2f}"
          f"  peak-imports {v['peak_minus_imports_bytes'] / 2**20:5.0f} "
          f"MiB = {v['ratio']:.2f}x input "
          f"({v['input_bytes'] / 2**20:.0f} MiB); "
          f"{v['ratio_after_runtime']:.2f}x above the started runtime "
          f"({v['runtime_bytes'] / 2**20:.0f} MiB); compiled programs "
          f"kept {v['compiled_bytes'] / 2**20:.0f} MiB; making the "
          f"stack peaked at "
          f"{v['stack_peak_minus_imports_bytes'] / v['input_bytes']:.2f}x")
    if m.startswith("detune_jax"):
      mib = lambda x: x / 2**20
      parts = dict(runtime=v["runtime_bytes"],
                   compiled=v["compiled_bytes"], stack=v["input_bytes"],
                   mean_then_W=v["xla_alias_bytes"],
                   xla_temporaries=v["xla_temp_bytes"])
      parts["other"] = v["peak_minus_imports_bytes"] - sum(parts.values())
      print("    breakdown of the peak (MiB): " + ", ".join(
          f"{key} {mib(x):.0f}" for key, x in parts.items()))
  return res


def print_floor(dj_res: Dict) -> None:
  """detune_jax's compilation, its matmul floors and its stopped run."""
  print(f"  detune_jax compilation (first call, not in wall): "
        f"{dj_res['compile_and_first_run_s']:.2f} s")
  fl = dj_res["floor"]
  print("  matmul floor per step at width q, one pass (D_i V_i or "
        "Q_i^T D_i) / two passes (both): " +
        ", ".join(f"q={q}: {a:.4f}/{b:.4f} s" for q, (a, b)
                  in fl["per_q"].items()))
  print(f"  floor of the run (sum over steps at their working rank; "
        f"median of the floors timed after each run): one pass "
        f"{fl['run_s']:.2f} s, two passes {fl['run_two_s']:.2f} s; "
        f"detune_jax is {np.median(fl['ratio_one']):.2f}x the one-pass "
        f"(runs {_fmt_list(fl['ratio_one'])}) and "
        f"{np.median(fl['ratio_two']):.2f}x the two-pass floor (median of "
        f"each run over the floor timed right after it)")
  print(f"  per step (the run less the same run stopped after step 1: "
        f"runs {_fmt_list(fl['first_step_walls'])} s): "
        f"{np.median(fl['ratio_loop']):.2f}x the one-pass floor of those "
        f"steps (runs {_fmt_list(fl['ratio_loop'])})")
  if dj_res.get("tta_step"):
    print(f"  detune_jax stopped after step {dj_res['tta_step']} "
          f"(plain W-step trace reaches it at step "
          f"{dj_res['tta_plain_step']}): W-Error {dj_res['tta_w_error']:.2f} "
          f"(runs {_fmt_list(dj_res['tta_walls'])} s)")


def run_synthetic_case(case: str, torch) -> Dict:
  """A synthetic case: both methods timed, their times-to-accuracy and
  ratios; prints it."""
  groups, n, r = make_case(case, FLAGS.seed, FLAGS.layers)
  n_layers = sum(int(W.shape[0]) for W, _ in groups)
  shapes = ", ".join(f"{int(W.shape[0])}x{tuple(W.shape[1:])}"
                     for W, _ in groups)
  print(f"\n== {case}: {n_layers} layers ({shapes}), n={n}, r={r}, "
        f"{FLAGS.steps} steps")
  res = {"detune_jax": run_detune_jax(groups, r, FLAGS.steps)}
  if torch is not None:
    res["reference"] = run_reference(groups, r, FLAGS.steps)
  target = res["reference"]["w_error"] if torch is not None else None
  for m, v in res.items():
    wall = float(np.median(v["walls"]))
    v["wall_median"] = wall
    v["s_per_step"] = wall / v["steps"]
    if target is not None and m == "detune_jax":
      v.update(measure_tta(groups, r, FLAGS.steps, v, target))
    elif target is not None:
      v["tta"], v["tta_step"] = _tta(v, target)
    print(f"  {m:11s} wall {wall:8.2f} s (runs {_fmt_list(v['walls'])})  "
          f"s/step {v['s_per_step']:.4f}  steps {v['steps']}  "
          f"W-Error {v['w_error']:7.2f}  "
          f"time-to-acc {_fmt(v.get('tta'))} s (step {v.get('tta_step')})")
  print_floor(res["detune_jax"])
  if target is not None:
    a, b = res["reference"], res["detune_jax"]
    ratio_wall = a["wall_median"] / b["wall_median"]
    ratio_tta = (a["tta"] / b["tta"]) if (a["tta"] and b["tta"]) else None
    print(f"  ratio reference/detune_jax: wall {ratio_wall:.1f}x, "
          f"s/step {a['s_per_step'] / b['s_per_step']:.1f}x, "
          f"time-to-accuracy {_fmt(ratio_tta, '{:.1f}')}x; "
          f"W-Error {b['w_error']:.2f} vs {a['w_error']:.2f}")
    res["ratio"] = dict(wall=ratio_wall, tta=ratio_tta)
  return res


def _plain(x):
  """``x`` with numpy arrays and scalars as lists and Python numbers."""
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return x


def main(argv: Sequence[str]) -> None:
  del argv
  if FLAGS._memory_child:
    print(json.dumps(memory_child(FLAGS._memory_child)))
    return
  torch = _torch() if FLAGS.reference else None
  if FLAGS.reference and torch is None:
    print("NOTE: torch is not installed (pip install .[reference]); "
          "the PyTorch reference is skipped, no ratios are printed.")
  else:
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}"
          if torch else "reference disabled")
  print(f"jax {jax.__version__}, devices {jax.devices()}, "
        f"cpus {os.cpu_count()}, repeats {FLAGS.repeats}")
  results = {}
  for case in FLAGS.cases:
    if case in REAL_CASES:
      results[case] = {}
      for n in FLAGS.minilm_ns:
        res = run_real_case(case, int(n), FLAGS.steps, torch)
        print_real_case(case, res)
        results[case][f"n{n}"] = res
    elif case == "mistral":
      results[case] = run_mistral_case(torch)
    else:
      results[case] = run_synthetic_case(case, torch)
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(_plain(results), f, indent=1)


def _fmt_list(xs):
  return ", ".join(f"{x:.2f}" for x in xs)


if __name__ == "__main__":
  app.run(main)
