"""The shipped bench of MiniLM LoRA adapters (detune_jax/data/minilm_bench),
its LoWRA Bench export, the study that reproduces the paper's tables on it,
and the demo that recovers all-MiniLM-L6-v2 from it."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from detune_jax.eval import bench_study as study
from detune_jax.io import peft
from detune_jax.lora import ATTENTION, MLP, bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK16 = bench.bench_dir("rank16")
MIXED = bench.bench_dir("mixed")
FEW_TEXTS = ["The quick brown fox jumps over the lazy dog.",
             "Return the sum of a sequence of numbers.", "", "x"]


def _record(subset_dir):
  with open(os.path.join(subset_dir, bench.BENCH_JSON)) as f:
    return json.load(f)


def test_bench_ships_inside_the_package():
  import detune_jax
  pkg = os.path.dirname(detune_jax.__file__)
  assert RANK16.startswith(pkg) and MIXED.startswith(pkg)
  with open(os.path.join(ROOT, "setup.cfg")) as f:
    cfg = f.read()
  assert "data/minilm_bench/*/*.json" in cfg
  assert "data/minilm_bench/*/*/*" in cfg
  size = sum(os.path.getsize(os.path.join(d, f))
             for d, _, fs in os.walk(os.path.dirname(RANK16)) for f in fs)
  assert size < 21e6, size


@pytest.mark.parametrize("subset, targets, modules", [
    ("rank16", ATTENTION, 24), ("mixed", ATTENTION + MLP, 36)])
def test_adapters_load_with_their_ranks_in_bf16(subset, targets, modules):
  spec = bench.SUBSETS[subset]
  patterns = [re.compile(t) for t in targets]
  for e in bench.plan(spec):
    cfg, st = peft.load_adapter(os.path.join(bench.bench_dir(subset), e.name))
    assert cfg["r"] == e.rank and cfg["lora_alpha"] == 32, e
    assert len(cfg["target_modules"]) == modules, e
    assert all(any(t.fullmatch(m + ".weight") for t in patterns)
               for m in cfg["target_modules"])
    assert len(st.names) == 2 * modules
    for key in st.names:
      array = st.read(key)
      assert array.dtype == bench.FACTOR_DTYPE, key
      assert e.rank in array.shape, key
  if subset == "mixed":
    assert sorted({e.rank for e in bench.plan(spec)}) == [4, 8, 16, 32]


@pytest.mark.parametrize("subset", ["rank16", "mixed"])
def test_every_adapter_improved_on_its_own_task(subset):
  record = _record(bench.bench_dir(subset))
  entries = {a["name"]: a for a in record["adapters"]}
  plan = bench.plan(bench.SUBSETS[subset])
  assert sorted(entries) == [e.name for e in plan]
  for e in plan:
    a = entries[e.name]
    assert (a["task"], a["seed"], a["rank"]) == (e.task, e.seed, e.rank)
    assert a["held_out_accuracy"] > a["baseline_accuracy"], a
  assert record["subset"] == subset


def test_adapters_change_only_their_targets():
  from detune_jax.io.models import ModelFiles
  base = ModelFiles(bench.base_dir())
  deltas = peft.adapter_deltas(os.path.join(RANK16, "lora_00"), base)
  assert len(deltas) == 24
  for name, (kind, delta) in deltas.items():
    assert kind == "add" and delta.shape == (384, 384), name
    assert 0 < np.abs(delta).max() < 1, name
  mixed = peft.adapter_factors(os.path.join(MIXED, "mixed_03"), base)
  shapes = sorted({(f.B.shape[0], f.A.shape[1]) for f in mixed.values()})
  assert shapes == [(384, 384), (384, 1536), (1536, 384)]
  assert {f.rank for f in mixed.values()} == {32}


def test_lowra_export_reads_back_as_the_merged_adapters(tmp_path):
  from detune_jax.io.lowra import LowraBench
  layers = bench.write_lowra(MIXED, str(tmp_path))
  assert layers == 36
  with open(tmp_path / "README.md") as f:
    assert "config_name: minilm_mixed" in f.read()
  lowra = LowraBench(str(tmp_path), "minilm_mixed", n_loras=8)
  b = study.load_bench([os.path.join(MIXED, e.name)
                        for e in bench.plan(bench.SUBSETS["mixed"])],
                       bench.base_dir())
  assert lowra.lora_ranks[0] == b.ranks.tolist()
  for shape, group in b.groups.items():
    name = group[0]
    np.testing.assert_array_equal(lowra.merged(name, None), b.base[name])
    for k in (0, 3, 7):
      np.testing.assert_allclose(lowra.merged(name, k), b.stacks[shape][0, k],
                                 rtol=0, atol=2e-7)


def test_study_scores_the_recovery_far_ahead_of_the_baselines():
  b = study.load_bench([os.path.join(RANK16, f"lora_{i:02d}")
                        for i in range(4)], bench.base_dir())
  assert b.stacks[(384, 384)].shape == (24, 4, 384, 384)
  scorer = study.Scorer(b, FEW_TEXTS)
  assert scorer.w_error(b.truth) <= -30  # exact: the metric's floor
  assert scorer.sbert(b.truth) < -15
  rows = study.score_subsets(b, scorer, [[0, 1, 2], [1, 2, 3]],
                             [study.LORA_FT, study.MEAN_LORA, study.AUTO],
                             log=lambda _: None)
  s = study.summary(rows)
  ft, mean, auto = (s[m] for m in (study.LORA_FT, study.MEAN_LORA,
                                   study.AUTO))
  assert auto["w_error"][0] < mean["w_error"][0] - 8
  assert mean["w_error"][0] < ft["w_error"][0]
  assert auto["sbert"][0] < mean["sbert"][0] - 8
  assert len(rows[study.AUTO]["layer_w_error"][1]) == 24
  table = study.markdown_table(rows)
  assert table.count("\n") == 4 and "| auto | -" in table


def test_bf16_release_is_scored_against_the_bf16_base():
  b = study.load_bench([os.path.join(RANK16, f"lora_{i:02d}")
                        for i in range(3)], bench.base_dir())
  released = study.release(b, study.BF16)
  name = b.names[0]
  truth = released.base[name]
  np.testing.assert_array_equal(truth, b.base[name].astype(study.BF16))
  S = released.stacks[(384, 384)]
  assert S.dtype == study.BF16
  np.testing.assert_array_equal(
      S[0, 1], (truth + (b.stacks[(384, 384)][0, 1] - b.base[name])
                ).astype(study.BF16))
  scorer = study.Scorer(released, FEW_TEXTS)
  assert scorer.bit_exact(released.truth, study.BF16) == 1.0
  assert scorer.sbert(released.truth) < -15
  rows = study.score_subsets(released, scorer, [[0, 1, 2]],
                             [study.MEAN_LORA], log=lambda _: None)
  assert 0 < rows[study.MEAN_LORA]["bit_exact"][0] < 0.5


@pytest.mark.slow
def test_reproduce_writes_tables_and_plots(tmp_path):
  texts = tmp_path / "texts.txt"
  texts.write_text("\n".join(FEW_TEXTS[:2]) + "\n")
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.reproduce", f"--out={out}",
       "--subsets=2", "--ns=2,3", "--steps=20", f"--texts={texts}"],
      cwd=ROOT, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "results.json") as f:
    res = json.load(f)
  for part in ("table", "sweep", "bf16", "mixed"):
    assert res[part]["seconds"] > 0
  auto = res["table"]["summary"]["auto"]
  assert auto["w_error"][0] < res["table"]["summary"]["Mean-LoRA"][
      "w_error"][0] - 5
  assert res["mixed"]["ranks"] == [4, 8, 16, 32, 4, 8, 16, 32]
  assert "bit_exact" in res["bf16"]["summary"]["auto"]
  for png in ("fig5_scheduler_per_layer.png", "fig6_scheduler_cumulative.png",
              "fig7_fig10_against_n.png"):
    assert (out / png).stat().st_size > 1000
  assert "## bf16" in (out / "tables.md").read_text()


def test_reproduce_refuses_a_missing_bench(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.reproduce", f"--out={tmp_path}",
       f"--bench_dir={tmp_path / 'nothing'}", "--parts=table"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "nothing" in proc.stderr and "bench.json" in proc.stderr


@pytest.mark.slow
def test_demo_recovers_minilm(tmp_path):
  # About 30 s on 2 CPU cores, compiles included: in the slow target, to keep
  # the default run well under CI's budget (the README's main command runs
  # the same code).
  from detune_jax.lora import demo
  result = demo.recover_minilm(None, str(tmp_path), n=5, progress_bar=False)
  ft, mean, rec = result.rows
  assert rec.w_error < mean.w_error - 5 and rec.w_error < ft.w_error
  assert rec.sbert_log10 < mean.sbert_log10 < 0


@pytest.mark.slow
def test_rebuilding_an_adapter_gives_the_shipped_one(tmp_path):
  # mixed_00 (vader, rank 4, attention and MLP): about 80 s on 2 cores.
  from detune_jax.lora.peft_files import FILES
  spec = bench.SUBSETS["mixed"]._replace(n=1)
  record = bench.build(str(tmp_path), spec, log=lambda _: None)
  shipped = {a["name"]: a for a in _record(MIXED)["adapters"]}["mixed_00"]
  built = record["adapters"][0]
  assert abs(built["held_out_accuracy"] - shipped["held_out_accuracy"]) < 0.01
  with open(tmp_path / "mixed_00" / FILES[1]) as f, \
      open(os.path.join(MIXED, "mixed_00", FILES[1])) as g:
    assert json.load(f) == json.load(g)
  _, new = peft.load_adapter(str(tmp_path / "mixed_00"))
  _, old = peft.load_adapter(os.path.join(MIXED, "mixed_00"))
  assert new.names == old.names
  for key in old.names:
    a = new.read(key).astype(np.float32)
    b = old.read(key).astype(np.float32)
    # bf16 factors: equal but for rounding where the platform's float
    # order differs.
    np.testing.assert_allclose(a, b, rtol=0.02, atol=2e-3 * np.abs(b).max())
