"""Stored solver programs (detune_jax.programs) and run timings."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import detune_jax as dj
from detune_jax import timings
from detune_jax.synthetic import lora_stack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Solves with the compilation cache at argv[1]; prints how often the spectral
# solver's programs were traced in this process, and the results' hash.
_SOLVE = """
import hashlib, json, sys
import jax, numpy as np
from detune_jax import timings
timings.enable_compilation_cache(sys.argv[1])
traced = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, d, **kw: traced.append(kw.get("fun_name"))
    if event == "/jax/core/compile/jaxpr_trace_duration" else None)
import detune_jax as dj
from detune_jax.synthetic import lora_stack
_, Wp = lora_stack(seed=0, d=40, k=32, n=4, rank=3)
dj.precompile(Wp.shape, 3, 50)      # the call below reuses its program
h = hashlib.sha256()
for solver in ("closed_form", "spectral_detuning", "auto"):
  W, _ = dj.solve(Wp, 3, solver=solver, steps=50)
  h.update(np.asarray(W).tobytes())
print(json.dumps({"traced": traced.count("spectral_detuning"),
                  "hash": h.hexdigest()}))
"""


def _solve(cache):
  res = subprocess.run([sys.executable, "-c", _SOLVE, str(cache)],
                       capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  return json.loads(res.stdout.strip().splitlines()[-1])


def test_stored_programs_skip_tracing_and_give_the_same_bytes(tmp_path):
  cache = tmp_path / "cache"
  first = _solve(cache)
  stored = os.listdir(cache / "detune_jax_programs")
  # auto reuses the closed form's program; its polishing step is one more.
  assert sorted(f.split("-")[0] for f in stored) == [
      "closed_form", "spectral_detuning", "spectral_detuning"]
  second = _solve(cache)
  # Traced once each in the first process (the 50 steps, auto's polishing
  # step), never in the second.
  assert first["traced"] == 2 and second["traced"] == 0
  assert second["hash"] == first["hash"]
  # Without the cache the solvers run as plain jitted functions: same bytes.
  assert _solve("")["hash"] == first["hash"]
  # A damaged stored program is exported again.
  for f in stored:
    (cache / "detune_jax_programs" / f).write_bytes(b"not a program")
  again = _solve(cache)
  assert again["traced"] and again["hash"] == first["hash"]


def test_programs_inside_a_users_jit():
  """Under the caller's own jit the solvers trace as usual."""
  _, Wp = lora_stack(seed=1, d=24, k=20, n=3, rank=2)
  W, _ = jax.jit(lambda x: dj.spectral_detuning(x, 2, 30))(Wp)
  W_plain, _ = dj.spectral_detuning(Wp, 2, 30)
  np.testing.assert_allclose(W, W_plain, atol=1e-6)


def test_timings_split_compile_from_phases():
  t = timings.Timings()
  with t.phase("solve"):
    f = jax.jit(lambda x: jnp.sin(x) @ x.T + 0.5)
    f(jnp.ones((17, 13))).block_until_ready()
  with t.phase("read"):
    pass
  s = t.summary()
  assert set(s) == {"solve", "read", "compile"}
  assert s["compile"] > 0 and s["read"] == 0.0
  assert t.seconds["solve"] >= s["compile"] + s["solve"] - 1e-3


def test_enable_compilation_cache(tmp_path, monkeypatch):
  configured = jax.config.jax_compilation_cache_dir
  try:
    assert timings.enable_compilation_cache("") is None
    assert not jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert timings.default_cache_dir() == str(
        tmp_path / "xdg" / "detune_jax" / "jax_cache")
    assert timings.enable_compilation_cache() == timings.default_cache_dir()
    path = timings.enable_compilation_cache(str(tmp_path / "c"))
    assert path == str(tmp_path / "c") and os.path.isdir(path)
    assert jax.config.jax_compilation_cache_dir == path
    # One already configured (by JAX_COMPILATION_CACHE_DIR or the caller)
    # is kept by default.
    assert timings.enable_compilation_cache() == path
  finally:
    jax.config.update("jax_compilation_cache_dir", configured)
