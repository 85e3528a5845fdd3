"""detune_jax.pipeline: whole-model recovery on tiny models."""

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

from conftest import TINY_FROZEN, TINY_LAYERS, TINY_RANKS, make_tiny
from detune_jax import pipeline
from detune_jax.io import BadInputError, ModelFiles, write_model
from test_io import write_lowra_parquet

STEPS = 100


def _config(models, out, **kw):
  kw.setdefault("steps", STEPS)
  return pipeline.RecoverConfig(models=tuple(models), output_dir=str(out), **kw)


@pytest.fixture(scope="module")
def recovered(tiny_models, tmp_path_factory):
  models, base = tiny_models
  out = tmp_path_factory.mktemp("rec") / "out"
  report = pipeline.recover(_config(models, out, ground_truth=base),
                            progress_bar=False)
  return models, base, out, report


def test_recovers_tiny_model(recovered):
  models, base, out, report = recovered
  assert report["n_models"] == 4 and report["complete"]
  assert report["n_solved"] == 3 and report["n_copied"] == len(TINY_FROZEN)
  assert report["w_error"] < -10
  assert report["mean_lora_w_error"] > -6
  for layer in report["layers"]:
    assert {"name", "shape", "rank", "steps", "loss", "w_error",
            "mean_lora_w_error"} <= set(layer)
    assert layer["w_error"] < -10, layer["name"]
    assert layer["ranks"] == list(TINY_RANKS)        # rank=auto, per LoRA
    assert layer["rank"] == max(TINY_RANKS)
    assert layer["rank_source"] == "estimated"
    # The default solver ("auto") is the closed form here (n = 4), polished
    # by one step.
    assert 0 <= layer["steps"] <= STEPS
    assert len(layer["loss_curve"]) == max(layer["steps"], 1)
  assert [l["name"] for l in report["layers"]] == list(TINY_LAYERS)
  with open(os.path.join(out, "report.json")) as f:
    assert json.load(f)["w_error"] == report["w_error"]


def test_output_keeps_every_tensor_and_dtype(recovered):
  models, base, out, _ = recovered
  got, ref, truth = (ModelFiles(out), ModelFiles(models[0]), ModelFiles(base))
  assert got.names == ref.names
  for name in ref.names:
    assert got.info(name).dtype == ref.info(name).dtype
    assert got.info(name).shape == ref.info(name).shape
    if name in TINY_FROZEN:   # copied through bit for bit
      np.testing.assert_array_equal(got.read(name), ref.read(name))
    else:
      np.testing.assert_allclose(got.read(name), truth.read(name), atol=1e-4)


def test_sharded_bf16_input_gives_sharded_output(tmp_path):
  models, base = make_tiny(tmp_path / "m", shards=2, dtype=ml_dtypes.bfloat16)
  out = tmp_path / "out"
  report = pipeline.recover(_config(models, out, ground_truth=base),
                            progress_bar=False)
  assert sorted(os.listdir(models[0])) == sorted(
      f for f in os.listdir(out) if "safetensors" in f)
  assert report["output_files"][-1] == "model.safetensors.index.json"
  got = ModelFiles(out)
  assert got.sharded and got.layout() == ModelFiles(models[0]).layout()
  assert got.info("enc.0.q.weight").dtype == "BF16"
  # bf16 rounding limits any solver; still far better than the mean.
  assert report["w_error"] < report["mean_lora_w_error"] - 1
  import safetensors.torch
  loaded = safetensors.torch.load_file(
      str(out / "model-00001-of-00002.safetensors"))
  assert str(loaded["enc.0.q.weight"].dtype) == "torch.bfloat16"


def test_differing_1d_tensors_are_averaged(tmp_path):
  models, base = make_tiny(tmp_path / "m")
  rng = np.random.default_rng(0)
  for i, m in enumerate(models):   # fine-tune a bias too
    mf = ModelFiles(m)
    t = {k: np.array(mf.read(k)) for k in mf.names}
    t["enc.0.q.bias"] = t["enc.0.q.bias"] + rng.normal(size=32).astype(
        np.float32) * 1e-3
    write_model(m, t)
  report = pipeline.recover(_config(models, tmp_path / "out",
                                    ground_truth=base), progress_bar=False)
  assert [a["name"] for a in report["averaged"]] == ["enc.0.q.bias"]
  mean = np.mean([ModelFiles(m).read("enc.0.q.bias") for m in models], 0)
  np.testing.assert_allclose(ModelFiles(tmp_path / "out").read(
      "enc.0.q.bias"), mean, rtol=1e-6)


def test_make_groups_respects_the_memory_budget():
  plans = [pipeline.TensorPlan(f"l{i}", "F32", (64, 64), "lora", (4, 4))
           for i in range(10)]
  plans.insert(3, pipeline.TensorPlan("x", "F32", (64, 32), "lora", (4, 4)))
  plans.append(pipeline.TensorPlan("y", "F32", (64, 64), "lora", (8, 8)))
  per = pipeline.layer_bytes(64, 64, 2)
  groups = pipeline.make_groups(plans, 2, 3.5 * per / 2**30)
  sizes = [(len(g.names), g.matrix_shape, g.ranks) for g in groups]
  assert sizes == [(3, (64, 64), (4, 4)), (3, (64, 64), (4, 4)),
                   (3, (64, 64), (4, 4)), (1, (64, 64), (4, 4)),
                   (1, (64, 32), (4, 4)), (1, (64, 64), (8, 8))]
  assert groups[0].names == ("l0", "l1", "l2")
  owner = pipeline.assign_groups(groups, 2)
  assert sorted(set(owner)) == [0, 1]
  # The dtype-aware grid step changes the budget of bf16/fp16 layers only.
  assert pipeline.make_groups(plans, 2, 3.5 * per / 2**30,
                              grid=True) == groups
  low = [p._replace(dtype="BF16") for p in plans]
  assert pipeline.make_groups(low, 2, 3.5 * per / 2**30) == groups
  per_grid = pipeline.layer_bytes(64, 64, 2, grid=True)
  assert per_grid > per
  budget = 2.5 * per_grid / 2**30
  sizes = [len(g.names) for g in pipeline.make_groups(low, 2, budget,
                                                      grid=True)]
  assert sizes == [2, 2, 2, 2, 2, 1, 1]


class _Killed(Exception):
  pass


def _stop_after(k):
  def hook(count):
    if count >= k:
      raise _Killed()
  return hook


def test_resume_after_stop_gives_identical_files(recovered, tmp_path):
  models, _, full, _ = recovered   # groups: 2 x [32, 24], 1 x [16, 36]
  part = tmp_path / "part"
  cfg = _config(models, part)
  with pytest.raises(_Killed):
    pipeline.recover(cfg, on_group_done=_stop_after(1), progress_bar=False)
  assert not os.path.exists(part / "model.safetensors")
  assert not os.path.exists(part / "report.json")
  assert sorted(os.listdir(part / "checkpoint")) == ["0"]
  solved = []
  report = pipeline.recover(cfg, on_group_done=solved.append,
                            progress_bar=False)
  assert solved == [1] and report["resumed_groups"] == 1
  assert report["groups"] == 2
  # Same bytes as the uninterrupted run (which also had ground truth: the
  # evaluation does not change the model).
  assert (part / "model.safetensors").read_bytes() == \
      (full / "model.safetensors").read_bytes()
  # Finished: a third start changes nothing and solves nothing.
  again = pipeline.recover(cfg, on_group_done=solved.append,
                           progress_bar=False)
  assert solved == [1] and again["fingerprint"] == report["fingerprint"]


def test_output_dir_of_a_different_run_is_refused(tiny_models, tmp_path):
  models, _ = tiny_models
  out = tmp_path / "out"
  pipeline.recover(_config(models, out), progress_bar=False)
  before = sorted(os.listdir(out))
  with pytest.raises(BadInputError, match="different run"):
    pipeline.recover(_config(models, out, steps=STEPS + 1),
                     progress_bar=False)
  assert sorted(os.listdir(out)) == before
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "model.safetensors").write_bytes(b"x")
  with pytest.raises(BadInputError, match="another run"):
    pipeline.recover(_config(models, foreign), progress_bar=False)


def test_rank_checks(tiny_models, tmp_path):
  models, _ = tiny_models
  with pytest.raises(BadInputError, match="too large") as e:
    pipeline.recover(_config(models, tmp_path / "a", rank=17),
                     progress_bar=False)
  assert e.value.tensor == "enc.0.conv.weight"   # [16, 36]: at most 16
  assert not os.path.exists(tmp_path / "a")
  with pytest.raises(BadInputError, match="rank"):
    pipeline.recover(_config(models, tmp_path / "b", rank="x"),
                     progress_bar=False)


def test_ambiguous_rank_policies(tmp_path):
  # Full-rank differences (not LoRA): rank=auto cannot tell a rank.
  rng = np.random.default_rng(0)
  base = {"w": rng.standard_normal((12, 10)).astype(np.float32)}
  models = []
  for i in range(3):
    write_model(tmp_path / f"m{i}", {"w": base["w"] + 0.1 * rng.standard_normal(
        (12, 10)).astype(np.float32)})
    models.append(str(tmp_path / f"m{i}"))
  with pytest.raises(BadInputError, match="rank=auto") as e:
    pipeline.recover(_config(models, tmp_path / "a"), progress_bar=False)
  assert e.value.tensor == "w" and not os.path.exists(tmp_path / "a")
  r = pipeline.recover(_config(models, tmp_path / "b", ambiguous_rank="mean"),
                       progress_bar=False)
  assert r["n_averaged"] == 1 and r["n_solved"] == 0
  r = pipeline.recover(_config(models, tmp_path / "c", ambiguous_rank="2",
                               steps=5), progress_bar=False)
  assert r["layers"][0]["ranks"] == [2, 2, 2]
  assert r["layers"][0]["rank_source"] == "fallback"


def test_lowra_bench_recovery(tmp_path):
  layers = {"vit.blocks.0.q.weight": (32, 24, TINY_RANKS + (2,)),
            "vit.blocks.0.v.weight": (32, 24, TINY_RANKS + (2,))}
  (tmp_path / "vit").mkdir()
  write_lowra_parquet(tmp_path / "vit/train-00000-of-00001.parquet", layers,
                      n_loras=5)
  cfg = pipeline.RecoverConfig(lowra_bench=str(tmp_path), subset="vit",
                               n_loras=4, output_dir=str(tmp_path / "out"),
                               steps=STEPS)
  report = pipeline.recover(cfg, progress_bar=False)
  assert report["n_models"] == 4 and report["n_solved"] == 2
  assert report["lowra_bench"]["lora_ids"] == [0, 1, 2, 3]
  assert report["w_error"] < -10
  assert report["mean_lora_w_error"] > -8
  assert all(l["ranks"] == list(TINY_RANKS) for l in report["layers"])
  got = ModelFiles(tmp_path / "out")
  assert got.names == list(layers)


def test_bf16_weak_rank_gaps_are_kept_when_consistent(tmp_path):
  # bf16 rounding noise weakens the rank gaps: the estimator calls this
  # layer ambiguous, but every pairwise rank is exactly r_i + r_j.
  rng = np.random.default_rng(0)
  W = rng.standard_normal((64, 64)).astype(np.float32) * 0.04
  models = []
  for i, r in enumerate((2, 4, 4, 8)):
    B = rng.standard_normal((64, r)).astype(np.float32)
    A = rng.standard_normal((r, 64)).astype(np.float32)
    write_model(tmp_path / f"m{i}", {"w": (W + B @ A * (0.04 / np.sqrt(r)))
                                     .astype(ml_dtypes.bfloat16)})
    models.append(str(tmp_path / f"m{i}"))
  cfg = _config(models, tmp_path / "out")
  plan = pipeline.scan(pipeline.open_inputs(cfg), cfg)[0]
  assert plan.ranks == (2, 4, 4, 8) and plan.rank_source == "consistent"
  strict = _config(models, tmp_path / "out", ambiguous_rank="error")
  with pytest.raises(BadInputError, match="weak rank gap") as e:
    pipeline.scan(pipeline.open_inputs(strict), strict)
  assert e.value.tensor == "w"


def test_bf16_release_is_refined_on_the_grid_by_default(tmp_path):
  models, base = make_tiny(tmp_path / "m", dtype=ml_dtypes.bfloat16)
  on = pipeline.recover(_config(models, tmp_path / "on", ground_truth=base),
                        progress_bar=False)
  off = pipeline.recover(_config(models, tmp_path / "off", ground_truth=base,
                                 dtype_aware=False), progress_bar=False)
  assert on["solver"] == "auto" and on["dtype_aware"] and not off["dtype_aware"]
  for layer in on["layers"]:
    assert 0 <= layer["bit_exact_fraction"] <= 1
  # The base lies on the bf16 grid: the grid step recovers more of it exactly.
  assert on["bit_exact_fraction"] > off["bit_exact_fraction"] + 0.02
  assert on["bit_exact_fraction"] > 0.8
  assert on["w_error"] <= off["w_error"]


def test_grid_settings_reach_the_grid_step(tmp_path, monkeypatch):
  from detune_jax import GridSettings
  from detune_jax.solvers import grid
  models, base = make_tiny(tmp_path / "m", dtype=ml_dtypes.bfloat16)
  seen = []
  real = grid.grid_refine

  def spy(*args, **kwargs):
    seen.append((kwargs["restarts"], kwargs["steps"],
                 kwargs["redecode_steps"], kwargs["momentum"],
                 kwargs["free_steps"]))
    return real(*args, **kwargs)

  monkeypatch.setattr(grid, "grid_refine", spy)
  default = pipeline.recover(_config(models, tmp_path / "a"),
                             progress_bar=False)
  tool = GridSettings()
  assert seen and set(seen) == {(tool.restarts, tool.steps,
                                 tool.redecode_steps, tool.momentum,
                                 tool.free_steps)}
  seen.clear()
  ablation = GridSettings(restarts=0, steps=7, redecode_steps=0, momentum=0.5,
                          free_steps=3)
  off = pipeline.recover(_config(models, tmp_path / "b", grid=ablation),
                         progress_bar=False)
  assert seen and set(seen) == {(0, 7, 0, 0.5, 3)}
  # The report records the settings off their defaults, by name.
  assert default["solver_options"] == {}
  assert off["solver_options"] == {"grid_restarts": 0, "grid_steps": 7,
                                   "grid_redecode_steps": 0,
                                   "grid_momentum": 0.5, "grid_free_steps": 3}
  inputs = pipeline.open_inputs(_config(models, "x"))
  assert (pipeline.run_fingerprint(_config(models, "x"), inputs) !=
          pipeline.run_fingerprint(_config(models, "x", grid=ablation), inputs))


def test_skipped_grid_steps_are_logged_by_the_pipeline(tmp_path, caplog):
  # Forced on every layer (no layer can reach a consistent fraction above 1).
  models, _ = make_tiny(tmp_path / "m", dtype=ml_dtypes.bfloat16)
  from detune_jax import GridSettings
  pipeline.recover(_config(models, tmp_path / "out",
                           grid=GridSettings(min_consistent=1.5)),
                   progress_bar=False)
  assert "grid step skipped on 2 of 2 layers" in caplog.text
  assert "on the bfloat16 grid" in caplog.text


def test_iterative_solver_reports_its_steps_and_loss_curve(tiny_models,
                                                           tmp_path,
                                                           monkeypatch):
  models, base = tiny_models
  # The solver is compiled from each group's shape before its stack is read.
  shapes = []
  real = pipeline.solve.precompile
  monkeypatch.setattr(pipeline.solve, "precompile",
                      lambda shape, *a, **kw: (shapes.append(shape),
                                               real(shape, *a, **kw))[1])
  report = pipeline.recover(_config(models, tmp_path / "out",
                                    ground_truth=base,
                                    solver="spectral_detuning"),
                            progress_bar=False)
  assert report["solver"] == "spectral_detuning" and report["w_error"] < -10
  assert shapes and all(len(s) == 4 and s[1] == len(models) for s in shapes)
  for layer in report["layers"]:
    assert 0 < layer["steps"] <= STEPS
    assert len(layer["loss_curve"]) == layer["steps"]
    assert layer["loss_curve"][-1] < layer["loss_curve"][0]


def test_relative_output_dir(tiny_models, tmp_path, monkeypatch):
  models, _ = tiny_models
  monkeypatch.chdir(tmp_path)
  report = pipeline.recover(_config(models, "rel_out"), progress_bar=False)
  assert report["complete"]
  assert (tmp_path / "rel_out" / "model.safetensors").exists()
  assert os.path.isdir(tmp_path / "rel_out" / "checkpoint" / "0")


def test_other_model_files_are_a_different_run(tmp_path):
  # Same names, sizes and headers, and the same bytes where the identity
  # samples the data: only the files' paths tell the two sets apart.
  import shutil
  import struct
  models, _ = make_tiny(tmp_path / "a", frozen={**TINY_FROZEN,
                                                "big.weight": (512, 512)})
  out = tmp_path / "out"
  pipeline.recover(_config(models, out), progress_bar=False)
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  others = [m.replace(str(tmp_path / "a"), str(tmp_path / "b"))
            for m in models]
  f = os.path.join(others[2], "model.safetensors")
  size = os.path.getsize(f)
  with open(f, "r+b") as fh:
    start = 8 + struct.unpack("<Q", fh.read(8))[0]
    at = start + ((size - start) * 17 // 32) // 4 * 4   # between two samples
    fh.seek(at)
    fh.write(struct.pack("<f", 0.5))
  with pytest.raises(BadInputError, match="different run"):
    pipeline.recover(_config(others, out), progress_bar=False)
  # The same files named another way are the same run.
  again = pipeline.recover(_config([m + "/" for m in models], out),
                           progress_bar=False)
  assert again["complete"]


def test_make_groups_never_mixes_dtypes():
  # q is bf16, v float32, same shape and ranks: batched together, the bf16
  # layer would lose the dtype-aware grid step (it needs one release dtype).
  plans = [pipeline.TensorPlan(f"{i}.{w}", dt, (64, 64), "lora", (4, 4))
           for i in range(3) for w, dt in (("q", "BF16"), ("v", "F32"))]
  for grid in (False, True):
    groups = pipeline.make_groups(plans, 2, 4.0, grid=grid)
    assert [g.names for g in groups] == [("0.q", "1.q", "2.q"),
                                         ("0.v", "1.v", "2.v")]
  dtype = {p.name: p.dtype for p in plans}
  small = pipeline.make_groups(
      plans, 2, 2.5 * pipeline.layer_bytes(64, 64, 2, grid=True) / 2**30,
      grid=True)
  assert [len(g.names) for g in small] == [2, 1, 3]
  assert all(len({dtype[n] for n in g.names}) == 1 for g in small)


@pytest.mark.parametrize("what", ["plan.json", "parts", "run.json"])
def test_files_a_run_did_not_write_are_refused(tiny_models, tmp_path, what):
  models, _ = tiny_models
  out = tmp_path / "out"
  out.mkdir()
  if what == "parts":
    (out / "parts").mkdir()
  else:   # the user's own plan.json, or a run.json that is not an object
    (out / what).write_text("[1, 2]\n")
  before = sorted(os.listdir(out))
  with pytest.raises(BadInputError, match="another run|not the run file"):
    pipeline.recover(_config(models, out), progress_bar=False)
  assert sorted(os.listdir(out)) == before
  if what != "parts":
    assert (out / what).read_text() == "[1, 2]\n"


def test_unwritable_output_dir_is_refused_before_the_scan(tiny_models,
                                                          tmp_path,
                                                          monkeypatch):
  models, _ = tiny_models

  def no_scan(*args, **kwargs):
    raise AssertionError("scanned before checking the output directory")

  monkeypatch.setattr(pipeline.run, "scan", no_scan)
  under_file = os.path.join(models[0], "model.safetensors", "sub")
  with pytest.raises(BadInputError, match="is not a directory"):
    pipeline.recover(_config(models, under_file), progress_bar=False)
  if os.path.isdir("/proc/self"):   # Linux: nothing can be created in /proc
    with pytest.raises(BadInputError, match="cannot write"):
      pipeline.recover(_config(models, "/proc/detune_out"),
                       progress_bar=False)


def test_non_finite_ground_truth_is_bad_input(tiny_models, tmp_path):
  models, base = tiny_models
  mf = ModelFiles(base)
  t = {k: np.array(mf.read(k)) for k in mf.names}
  t["enc.1.q.weight"][0, 0] = np.inf
  write_model(tmp_path / "gt", t)
  with pytest.raises(BadInputError, match="non-finite") as e:
    pipeline.recover(_config(models, tmp_path / "out",
                             ground_truth=str(tmp_path / "gt")),
                     progress_bar=False)
  assert e.value.tensor == "enc.1.q.weight"
  assert e.value.file == str(tmp_path / "gt" / "model.safetensors")
  assert not os.path.exists(tmp_path / "out")


def test_differing_tokens_of_shape_1_1_d_are_averaged(tmp_path):
  # A ViT cls_token [1, 1, d] is a vector, not a rank-1 LoRA matrix.
  models, base = make_tiny(tmp_path / "m", frozen={**TINY_FROZEN,
                                                   "cls_token": (1, 1, 24)})
  rng = np.random.default_rng(0)
  for m in models:
    mf = ModelFiles(m)
    t = {k: np.array(mf.read(k)) for k in mf.names}
    t["cls_token"] = t["cls_token"] + rng.normal(size=(1, 1, 24)).astype(
        np.float32) * 1e-3
    write_model(m, t)
  report = pipeline.recover(_config(models, tmp_path / "out"),
                            progress_bar=False)
  assert [a["name"] for a in report["averaged"]] == ["cls_token"]
  assert report["n_solved"] == len(TINY_LAYERS)


def test_single_point_loss_curves_are_drawn(tmp_path):
  import matplotlib.image
  from detune_jax import plots
  report = {"n_models": 3, "layers": [
      {"loss_curve": [10.0 ** -i]} for i in range(3)]}
  path = plots.plot_loss_curves(report, str(tmp_path / "loss.png"))
  rgb = matplotlib.image.imread(path)[..., :3]
  colored = (rgb.max(-1) - rgb.min(-1)) > 0.2   # axes and text are grey
  assert colored.sum() > 20


def test_finished_run_leaves_no_empty_parts_folder(recovered):
  _, _, out, _ = recovered
  assert not os.path.exists(out / "parts")
  assert {"checkpoint", "model.safetensors", "report.json"} <= set(
      os.listdir(out))


def test_two_models_warn_that_the_rank_split_is_a_guess(tiny_models, caplog):
  # W'_0 - W'_1 shows the sum of the two ranks only (an audit found true
  # ranks [4, 8] reported as [6, 6] without a word).
  models, _ = tiny_models
  for chosen, warned in ((models[:2], True), (models[:3], False)):
    caplog.clear()
    config = _config(chosen, "unused")
    pipeline.scan(pipeline.open_inputs(config), config)
    assert ("only the sum of each layer's two LoRA ranks" in caplog.text) \
        == warned
  caplog.clear()
  config = _config(models[:2], "unused", rank="4")
  pipeline.scan(pipeline.open_inputs(config), config)
  assert "two LoRA ranks" not in caplog.text


def test_equal_models_are_bad_input(tiny_models, tmp_path):
  """Two models equal in every tensor add no information: bad input naming
  both, found while scanning, also where the rank estimate would fail on
  them first (rank="auto")."""
  models, _ = tiny_models
  copy = tmp_path / "copy"
  shutil.copytree(models[1], copy)
  for rank in ("auto", "4"):
    config = _config([models[0], models[1], str(copy)], tmp_path / "out",
                     rank=rank)
    with pytest.raises(BadInputError, match="every tensor equals") as e:
      pipeline.recover(config, progress_bar=False)
    assert str(copy) in str(e.value) and models[1] in str(e.value)
    assert not os.path.exists(tmp_path / "out")
  with pytest.raises(BadInputError, match="is the same model as"):
    pipeline.recover(_config([models[0]] * 3, tmp_path / "out"),
                     progress_bar=False)


def test_explain_steps_checks_the_output_against_the_releases(tmp_path,
                                                             tiny_models):
  from detune_jax.solvers import grid_diagnostics
  models, base = make_tiny(tmp_path / "m", dtype=ml_dtypes.bfloat16)
  cfg = _config(models, tmp_path / "auto", explain_steps=4000)
  auto = pipeline.recover(cfg, progress_bar=False)
  mean = pipeline.recover(_config(models, tmp_path / "mean",
                                  solver="mean_lora", explain_steps=500),
                          progress_bar=False)
  for report in (auto, mean):
    ex = report["explain"]
    assert ex["layers"] == report["n_solved"] > 0
    assert ex["explained_layers"] == sum(l["explained"]
                                         for l in report["layers"])
  # auto's output reproduces nearly all released values (no ground truth
  # read); the Mean-LoRA average is explained nowhere. (Whether a tiny
  # layer's auto output is explained whole turns on float-level changes of
  # the grid step's start: 5 of 12 layers over four other seeds of these
  # models, before and after a change of the solver's last bits.)
  assert auto["explain"]["reproduced_fraction"] > 0.99
  assert mean["explain"]["explained_layers"] == 0
  assert mean["explain"]["reproduced_fraction"] < 0.9
  # The flags are explain_releases' on the written output and the inputs.
  layer = auto["layers"][0]
  out = ModelFiles(str(tmp_path / "auto")).read(layer["name"])
  stack = np.stack([ModelFiles(m).read(layer["name"]) for m in models])
  d, k = layer["matrix_shape"]
  direct = grid_diagnostics.explain_releases(
      stack.reshape(-1, d, k), np.asarray(out, np.float32).reshape(d, k),
      tuple(layer["ranks"]), max_steps=4000)
  assert bool(direct.explained) == layer["explained"]
  assert float(direct.reproduced) == layer["reproduced_fraction"]
  # Off by default, and part of the run's fingerprint only when on.
  plain = pipeline.recover(_config(models, tmp_path / "plain"),
                           progress_bar=False)
  assert "explain" not in plain and "explained" not in plain["layers"][0]
  inputs = pipeline.open_inputs(cfg)
  assert (pipeline.run_fingerprint(_config(models, "x"), inputs) !=
          pipeline.run_fingerprint(cfg, inputs))
  # float32 releases: nothing to check.
  f32 = pipeline.recover(_config(tiny_models[0], tmp_path / "f32",
                                 explain_steps=100), progress_bar=False)
  assert f32["explain"]["layers"] == 0
  assert f32["explain"]["reproduced_fraction"] is None
