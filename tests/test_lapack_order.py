"""No compiled program of the solvers runs two batched LAPACK calls at once.

See tests/lapack_order.py: with jaxlib 0.10 two such calls side by side can
deadlock XLA:CPU's thread pool. Every program the solvers compile on small
inputs is dumped by XLA and checked.
"""

import glob
import os
import subprocess
import sys

import pytest

from lapack_order import concurrent_lapack_calls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROGRAMS = """
import jax.numpy as jnp, numpy as np
import detune_jax as dj
from detune_jax.synthetic import lora_stack
W, Wp = lora_stack(seed=0, d=48, k=40, n=5, rank=3)
Wp2 = jnp.stack([Wp, Wp + 1e-3])
low = Wp2.astype(jnp.bfloat16)
for x in (Wp, Wp2):
  for kw in (dict(), dict(alternate=False), dict(svd="randomized"),
             dict(svd="exact"), dict(exact_loss=True), dict(oversample=2)):
    dj.spectral_detuning(x, 3, 80, **kw)
  dj.spectral_detuning(x, (2, 3, 3, 3, 3), 80)
  dj.spectral_detuning(x, 3, 80, W_true=x[..., 0, :, :])
  for solver in ("auto", "closed_form", "closed_form+refine",
                 "spectral_detuning"):
    dj.solve(x, 3, solver=solver, steps=20)
  dj.solve(x[..., :2, :, :], 3, solver="auto", steps=20)
  dj.solve(x.astype(jnp.bfloat16), 3, steps=20)
dj.explain_releases(low[0], np.asarray(dj.solve(low[0], 3)[0]), 3,
                    max_steps=300)
dj.estimate_rank(Wp)
"""


@pytest.mark.slow    # about 90 s on 2 cores: it compiles every solver variant
def test_no_two_batched_lapack_calls_run_at_once(tmp_path):
  dump = tmp_path / "hlo"
  env = dict(os.environ, PYTHONPATH=ROOT,
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                        f" --xla_dump_to={dump} --xla_dump_hlo_as_text"))
  # Every program compiled here, none loaded from a compilation cache.
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  subprocess.run([sys.executable, "-c", _PROGRAMS], env=env, cwd=ROOT,
                 check=True, capture_output=True, timeout=600)
  programs = glob.glob(str(dump / "*after_optimizations.txt"))
  assert len(programs) > 20
  lapack = [p for p in programs if "lapack_" in open(p).read()]
  assert len(lapack) > 10                  # the check has something to check
  bad = {os.path.basename(p): concurrent_lapack_calls(open(p).read())[:3]
         for p in lapack}
  assert not {k: v for k, v in bad.items() if v}
