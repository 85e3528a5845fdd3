"""detune_jax.io: safetensors files and models, LoWRA parquet, PEFT, progress."""

import json
import os
import pickle

import ml_dtypes
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from detune_jax.io import (BadInputError, LowraBench, ModelFiles, Progress,
                           SafetensorsFile, check_same_tensors, load_file,
                           merge_adapter, save_file, write_model)


def _tensors(seed=0):
  rng = np.random.default_rng(seed)
  return {"w": rng.standard_normal((5, 3)).astype(np.float32),
          "h": rng.standard_normal((4,)).astype(ml_dtypes.bfloat16),
          "i": np.arange(6, dtype=np.int64).reshape(2, 3),
          "e": np.zeros((0, 3), np.float16)}


def test_roundtrip_with_the_safetensors_library(tmp_path):
  import safetensors.numpy
  import safetensors.torch
  import torch
  t = _tensors()
  save_file(t, tmp_path / "a.safetensors", {"format": "pt"})
  # Files we write are read by the reference library (torch for bf16).
  ref = safetensors.torch.load_file(str(tmp_path / "a.safetensors"))
  np.testing.assert_array_equal(ref["w"].numpy(), t["w"])
  np.testing.assert_array_equal(ref["h"].float().numpy(),
                                t["h"].astype(np.float32))
  # Files the reference library writes are read by us, bf16 included.
  safetensors.torch.save_file(
      {"b": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)},
      str(tmp_path / "b.safetensors"))
  b = SafetensorsFile(tmp_path / "b.safetensors").read("b")
  assert b.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(b.astype(np.float32),
                                np.arange(6).reshape(2, 3))
  back = load_file(tmp_path / "a.safetensors")
  for k in t:
    assert back[k].dtype == t[k].dtype and back[k].shape == t[k].shape
    np.testing.assert_array_equal(back[k], t[k])


def test_read_is_memory_mapped(tmp_path):
  save_file(_tensors(), tmp_path / "a.safetensors")
  f = SafetensorsFile(tmp_path / "a.safetensors")
  a = f.read("w")
  assert not a.flags.writeable
  assert isinstance(f._mmap, np.memmap)
  assert np.shares_memory(a, f._mmap)


def test_truncated_and_corrupt_files(tmp_path):
  save_file(_tensors(), tmp_path / "a.safetensors")
  raw = (tmp_path / "a.safetensors").read_bytes()
  (tmp_path / "t.safetensors").write_bytes(raw[:-10])
  with pytest.raises(BadInputError) as e:
    SafetensorsFile(tmp_path / "t.safetensors")
  assert "truncated" in str(e.value) and e.value.tensor is not None
  assert str(tmp_path / "t.safetensors") in str(e.value)
  (tmp_path / "c.safetensors").write_bytes(raw[:8] + b"{not json" + raw[17:])
  with pytest.raises(BadInputError, match="corrupt"):
    SafetensorsFile(tmp_path / "c.safetensors")
  (tmp_path / "s.safetensors").write_bytes(b"abc")
  with pytest.raises(BadInputError, match="not a safetensors"):
    SafetensorsFile(tmp_path / "s.safetensors")
  with pytest.raises(BadInputError, match="no such file"):
    SafetensorsFile(tmp_path / "missing.safetensors")


def test_sharded_model_directory(tmp_path):
  t = {f"t{i}": np.full((3, 2), i, np.float32) for i in range(5)}
  write_model(tmp_path / "m", t, shards=2)
  names = sorted(os.listdir(tmp_path / "m"))
  assert names == ["model-00001-of-00002.safetensors",
                   "model-00002-of-00002.safetensors",
                   "model.safetensors.index.json"]
  m = ModelFiles(tmp_path / "m")
  assert m.sharded and sorted(m.names) == sorted(t)
  assert [f for f, _ in m.layout()] == names[:2]
  np.testing.assert_array_equal(m.read("t4"), t["t4"])
  index = json.loads((tmp_path / "m/model.safetensors.index.json").read_text())
  assert index["metadata"]["total_size"] == 5 * 6 * 4
  os.remove(tmp_path / "m/model-00002-of-00002.safetensors")
  with pytest.raises(BadInputError, match="missing") as e:
    ModelFiles(tmp_path / "m")
  assert "model-00002-of-00002" in str(e.value)


class _Evil:
  """Unpickling this would create a directory: proof of unpickling."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt",
                                  "model.ckpt", "model.pth"])
def test_pickles_are_refused_unopened(tmp_path, name):
  marker = str(tmp_path / "unpickled")
  (tmp_path / "d").mkdir()
  for path in (tmp_path / name, tmp_path / "d" / name):
    path.write_bytes(pickle.dumps(_Evil(marker)))
  for target in (tmp_path / name, tmp_path / "d"):
    with pytest.raises(BadInputError, match="pickle"):
      ModelFiles(target)
  assert not os.path.exists(marker)


def test_check_same_tensors(tmp_path):
  a = {"x": np.zeros((2, 3), np.float32), "y": np.zeros(3, np.float32)}
  write_model(tmp_path / "a", a)
  write_model(tmp_path / "b", {"x": np.zeros((3, 2), np.float32),
                               "y": np.zeros(3, np.float32)})
  write_model(tmp_path / "c", {"x": a["x"]})
  write_model(tmp_path / "d", {"x": a["x"], "y": np.zeros(3, np.float16)})
  ma, mb, mc, md = (ModelFiles(tmp_path / k) for k in "abcd")
  check_same_tensors([ma, ModelFiles(tmp_path / "a")])
  with pytest.raises(BadInputError, match="shape") as e:
    check_same_tensors([ma, mb])
  assert e.value.tensor == "x"
  with pytest.raises(BadInputError, match="missing") as e:
    check_same_tensors([ma, mc])
  assert e.value.tensor == "y"
  with pytest.raises(BadInputError, match="dtype"):
    check_same_tensors([ma, md])


def write_lowra_parquet(path, layers, n_loras, seed=0, row_group_size=2):
  """A LoWRA Bench-format parquet file (nested-list weights, as HF writes).

  Returns ``{pre_ft_name: (W_pre, [merged_i])}``.
  """
  rng = np.random.default_rng(seed)
  cols = {c: [] for c in ("layer_model", "layer_name", "pre_ft_name",
                          "pre_ft_weight")}
  truth = {}
  for name, (d, k, ranks) in layers.items():
    ranks = [ranks] * n_loras if np.isscalar(ranks) else list(ranks)
    W = (rng.standard_normal((d, k)) * 0.02).astype(np.float32)
    cols["layer_model"].append("vit")
    cols["layer_name"].append(name.rsplit(".", 1)[0])
    cols["pre_ft_name"].append(name)
    cols["pre_ft_weight"].append(W.tolist())
    merged = []
    for i in range(n_loras):
      r = ranks[i]
      A = (rng.standard_normal((r, k)) * 0.1).astype(np.float32)
      B = (rng.standard_normal((d, r)) * 0.1).astype(np.float32)
      alpha = 16.0
      for c, v in ((f"lora_{i}_name", f"task{i}"), (f"lora_{i}_rank", r),
                   (f"lora_{i}_alpha", alpha), (f"lora_{i}_A_weight",
                                                A.tolist()),
                   (f"lora_{i}_B_weight", B.tolist())):
        cols.setdefault(c, []).append(v)
      merged.append(W + (np.float32(alpha / r) * B) @ A)
    truth[name] = (W, merged)
  pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
  return truth


def test_lowra_bench_parquet(tmp_path):
  (tmp_path / "vit").mkdir()
  (tmp_path / "other").mkdir()
  layers = {"blocks.0.q.weight": (12, 10, 2), "blocks.0.v.weight": (12, 10, 2),
            "blocks.1.q.weight": (8, 10, 3)}
  truth = write_lowra_parquet(tmp_path / "vit/train-00000.parquet", layers, 3)
  write_lowra_parquet(tmp_path / "other/train-00000.parquet", layers, 3)
  bench = LowraBench(tmp_path, "vit", n_loras=3)
  assert bench.files == [str(tmp_path / "vit/train-00000.parquet")]
  assert bench.names == list(layers)
  assert bench.lora_ranks[2] == [3, 3, 3]
  for name, (W, merged) in truth.items():
    np.testing.assert_array_equal(bench.ground_truth.read(name), W)
    for i, m in enumerate(bench.models):
      np.testing.assert_allclose(m.read(name), merged[i], rtol=0, atol=1e-7)
  sub = LowraBench(tmp_path / "vit", None, lora_ids=[2, 0])
  np.testing.assert_allclose(sub.models[0].read("blocks.0.q.weight"),
                             truth["blocks.0.q.weight"][1][2], atol=1e-7)
  with pytest.raises(BadInputError, match="lora_3_rank"):
    LowraBench(tmp_path, "vit", n_loras=6)
  with pytest.raises(BadInputError, match="no parquet"):
    LowraBench(tmp_path, "sd")


def _adapter(tmp_path, base, r=2, alpha=8.0, rslora=False):
  rng = np.random.default_rng(1)
  A = rng.standard_normal((r, 6)).astype(np.float32)
  B = rng.standard_normal((4, r)).astype(np.float32)
  Ac = rng.standard_normal((r, 2, 3, 3)).astype(np.float32)
  Bc = rng.standard_normal((5, r, 1, 1)).astype(np.float32)
  Ae = rng.standard_normal((r, 7)).astype(np.float32)
  Be = rng.standard_normal((3, r)).astype(np.float32)
  head = rng.standard_normal((2, 6)).astype(np.float32)
  ad = tmp_path / "adapter"
  ad.mkdir()
  p = "base_model.model."
  save_file({p + "enc.q.lora_A.weight": A, p + "enc.q.lora_B.weight": B,
             p + "conv.lora_A.weight": Ac, p + "conv.lora_B.weight": Bc,
             p + "emb.lora_embedding_A": Ae, p + "emb.lora_embedding_B": Be,
             p + "head.modules_to_save.default.weight": head},
            ad / "adapter_model.safetensors")
  (ad / "adapter_config.json").write_text(json.dumps(
      {"r": r, "lora_alpha": alpha, "use_rslora": rslora,
       "target_modules": ["q", "conv", "emb"], "peft_type": "LORA"}))
  scale = alpha / (np.sqrt(r) if rslora else r)
  want = dict(base)
  want["enc.q.weight"] = base["enc.q.weight"] + scale * B @ A
  want["conv.weight"] = base["conv.weight"] + scale * (
      Bc.reshape(5, r) @ Ac.reshape(r, -1)).reshape(5, 2, 3, 3)
  want["emb.weight"] = base["emb.weight"] + scale * (Be @ Ae).T
  want["head.weight"] = head
  return ad, want


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_peft_adapter(tmp_path, rslora):
  rng = np.random.default_rng(0)
  base = {"enc.q.weight": rng.standard_normal((4, 6)).astype(np.float32),
          "enc.q.bias": rng.standard_normal(4).astype(np.float32),
          "conv.weight": rng.standard_normal((5, 2, 3, 3)).astype(np.float32),
          "emb.weight": rng.standard_normal((7, 3)).astype(np.float32),
          "head.weight": np.zeros((2, 6), np.float32)}
  write_model(tmp_path / "base", base, shards=2)
  ad, want = _adapter(tmp_path, base, rslora=rslora)
  changed = merge_adapter(tmp_path / "base", ad, tmp_path / "out")
  assert changed == ["conv.weight", "emb.weight", "enc.q.weight",
                     "head.weight"]
  out = ModelFiles(tmp_path / "out")
  assert out.sharded and sorted(out.names) == sorted(base)
  for k, v in want.items():
    np.testing.assert_allclose(out.read(k), v, rtol=1e-5, atol=1e-6)


def test_merge_peft_keeps_bf16_and_refuses_pickled_adapters(tmp_path):
  base = {"enc.q.weight": np.ones((4, 6), ml_dtypes.bfloat16)}
  write_model(tmp_path / "base", base)
  ad = tmp_path / "ad"
  ad.mkdir()
  (ad / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 2}')
  (ad / "adapter_model.bin").write_bytes(b"not opened")
  with pytest.raises(BadInputError, match="pickle"):
    merge_adapter(tmp_path / "base", ad, tmp_path / "out")
  save_file({"base_model.model.enc.q.lora_A.weight": np.ones((2, 6),
                                                             np.float32),
             "base_model.model.enc.q.lora_B.weight": np.ones((4, 2),
                                                             np.float32)},
            ad / "adapter_model.safetensors")
  merge_adapter(tmp_path / "base", ad, tmp_path / "out")
  got = ModelFiles(tmp_path / "out").read("enc.q.weight")
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32), np.full((4, 6), 3.0))


def test_progress_roundtrip_and_parts(tmp_path):
  tree = {"W_0": np.arange(6, dtype=np.float32).reshape(2, 3).astype(
              ml_dtypes.bfloat16),
          "loss": np.ones((1, 4), np.float32), "steps": np.array([4], np.int32),
          "seconds": np.asarray(1.5)}
  p = Progress(tmp_path)
  assert p.done() == set()
  p.save(3, tree)
  worker = Progress(tmp_path, process_index=1)
  worker.save(5, tree)
  assert os.path.exists(tmp_path / "parts/group_000005.safetensors")
  assert p.done() == {3, 5}
  for g in (3, 5):
    back = Progress(tmp_path).load(g)
    for k, v in tree.items():
      assert back[k].dtype == v.dtype
      np.testing.assert_array_equal(back[k], v)
  p.ingest_parts()
  assert not os.listdir(tmp_path / "parts")
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoint")) == [3, 5]
  assert p.done() == {3, 5}


def _raw_file(path, header, data=b"\0" * 64):
  raw = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(len(raw).to_bytes(8, "little") + raw + data)
  return str(path)


def _t(b, e, shape=None, dtype="F32"):
  return {"dtype": dtype, "shape": [(e - b) // 4] if shape is None else shape,
          "data_offsets": [b, e]}


@pytest.mark.parametrize("case,header,expect", [
    ("meta_list", {"__metadata__": ["a"], "a": _t(0, 8)}, "__metadata__"),
    ("meta_str", {"__metadata__": "pt", "a": _t(0, 8)}, "__metadata__"),
    ("meta_int", {"__metadata__": {"format": 1}, "a": _t(0, 8)},
     "__metadata__"),
    ("overlap", {"a": _t(0, 16), "b": _t(8, 24)}, "overlaps tensor 'a'"),
    ("same", {"a": _t(0, 16), "b": _t(0, 16)}, "overlaps tensor"),
    ("gap", {"a": _t(0, 8), "b": _t(16, 24)}, "gap of 8 bytes"),
    ("late_start", {"a": _t(8, 16)}, "gap of 8 bytes"),
    ("shape_str", {"a": _t(0, 4, shape="1")}, "shape '1'"),
    ("shape_float", {"a": _t(0, 8, shape=[2.0])}, "not a list of ints"),
    ("offsets_bad", {"a": {"dtype": "F32", "shape": [2],
                           "data_offsets": [0, 4, 8]}}, "two ints"),
    ("dtype_list", {"a": _t(0, 8, dtype=["F32"])}, "unsupported dtype"),
    ("entry_list", {"a": [1, 2]}, "not an object"),
])
def test_malformed_headers_are_bad_input(tmp_path, case, header, expect):
  path = _raw_file(tmp_path / f"{case}.safetensors", header)
  with pytest.raises(BadInputError, match=expect) as e:
    SafetensorsFile(path)
  assert path in str(e.value)
  if "__metadata__" not in header:
    assert e.value.tensor in header


def test_contiguous_headers_with_empty_tensors_are_read(tmp_path):
  path = _raw_file(tmp_path / "ok.safetensors", {
      "__metadata__": None, "b": _t(8, 16), "z": _t(8, 8, shape=[0]),
      "a": _t(0, 8)}, data=np.arange(4, dtype=np.float32).tobytes())
  f = SafetensorsFile(path)
  assert f.names == ["a", "b", "z"] and f.metadata == {}
  np.testing.assert_array_equal(f.read("b"), [2, 3])


def test_index_weight_map_values_must_be_file_names(tmp_path):
  write_model(tmp_path / "m", {f"t{i}": np.ones((2, 2), np.float32)
                               for i in range(2)}, shards=2)
  index = tmp_path / "m" / "model.safetensors.index.json"
  good = json.loads(index.read_text())
  for bad in (1, None, ["model-00001-of-00002.safetensors"]):
    broken = dict(good, weight_map=dict(good["weight_map"], t1=bad))
    index.write_text(json.dumps(broken))
    with pytest.raises(BadInputError, match="not a file name") as e:
      ModelFiles(tmp_path / "m")
    assert str(index) in str(e.value) and e.value.tensor == "t1"


def test_peft_adapters_are_not_models(tmp_path):
  save_file({"base_model.model.q.lora_A.weight": np.ones((2, 6), np.float32)},
            tmp_path / "adapter_model.safetensors")
  adapter = tmp_path / "adapter"
  adapter.mkdir()
  os.link(tmp_path / "adapter_model.safetensors",
          adapter / "adapter_model.safetensors")
  config_only = tmp_path / "config_only"   # beside a model file
  write_model(config_only, {"w": np.ones((2, 2), np.float32)})
  (config_only / "adapter_config.json").write_text('{"r": 2}')
  for path in (adapter, config_only, tmp_path / "adapter_model.safetensors"):
    with pytest.raises(BadInputError, match="is a PEFT adapter, not a merged "
                       "model: merge it with python -m experiments.merge_peft"
                       ) as e:
      ModelFiles(path)
    assert e.value.file == str(path)
