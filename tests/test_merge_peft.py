"""experiments.merge_peft as a subprocess."""

import os
import subprocess
import sys

import numpy as np

from detune_jax.io import ModelFiles, write_model
from test_io import _adapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*flags):
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([sys.executable, "-m", "experiments.merge_peft",
                         *flags], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=120)


def test_merge_peft_cli(tmp_path):
  rng = np.random.default_rng(0)
  base = {"enc.q.weight": rng.standard_normal((4, 6)).astype(np.float32),
          "conv.weight": rng.standard_normal((5, 2, 3, 3)).astype(np.float32),
          "emb.weight": rng.standard_normal((7, 3)).astype(np.float32),
          "head.weight": np.zeros((2, 6), np.float32)}
  write_model(tmp_path / "base", base)
  ad, want = _adapter(tmp_path, base)
  res = _run(f"--base={tmp_path / 'base'}", f"--adapter={ad}",
             f"--output_dir={tmp_path / 'ft'}")
  assert res.returncode == 0, res.stderr
  assert "merged 4 tensors" in res.stdout
  got = ModelFiles(tmp_path / "ft")
  for k, v in want.items():
    np.testing.assert_allclose(got.read(k), v, rtol=1e-5, atol=1e-6)
  bad = _run(f"--base={tmp_path / 'base'}", f"--adapter={tmp_path / 'nope'}",
             f"--output_dir={tmp_path / 'ft2'}")
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
  assert "adapter_config.json" in bad.stderr
  assert not os.path.exists(tmp_path / "ft2")
