"""The Flax ports against their PyTorch originals (transformers), and their
checkpoint loading.

``*_vs_reference`` tests build the PyTorch model from a tiny random config
(no download), save it as an HF directory, load that directory into the
port and compare in float32 with explicit tolerances.
"""

import json
import os
import pickle

import jax.numpy as jnp
import numpy as np
import pytest

from detune_jax.io.errors import BadInputError
from detune_jax.io.models import write_model
from detune_jax.models import bert, vit

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5


def _save(model, path):
  model.save_pretrained(str(path))
  return str(path)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.BertConfig(
      vocab_size=99, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
      type_vocab_size=2)
  model = transformers.BertModel(cfg).eval()
  return model, _save(model, tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def tiny_vit_cfg():
  return transformers.ViTConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=37, image_size=32, patch_size=8, num_labels=5)


def test_bert_vs_reference(tiny_bert):
  model, path = tiny_bert
  rng = np.random.RandomState(0)
  ids = rng.randint(0, 99, (3, 11))
  types = rng.randint(0, 2, (3, 11))
  mask = np.ones((3, 11), np.int64)
  mask[1, 7:] = 0
  mask[2, 3:] = 0
  with torch.no_grad():
    ref = model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                token_type_ids=torch.tensor(types), output_hidden_states=True)
  out = bert.load(path)(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
  assert len(out["hidden_states"]) == len(ref.hidden_states) == 3
  for r, o in zip(ref.hidden_states, out["hidden_states"]):
    np.testing.assert_allclose(np.asarray(o), r.numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(out["pooler_output"]),
                             ref.pooler_output.numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("cls", ["ViTModel", "ViTForImageClassification"])
def test_vit_vs_reference(tiny_vit_cfg, tmp_path, cls):
  torch.manual_seed(1)
  model = getattr(transformers, cls)(tiny_vit_cfg).eval()
  path = _save(model, tmp_path / cls)
  x = np.random.RandomState(0).randn(2, 3, 32, 32).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.tensor(x), output_hidden_states=True)
  out = vit.load(path)(jnp.asarray(x))
  assert len(out["hidden_states"]) == len(ref.hidden_states) == 3
  for r, o in zip(ref.hidden_states, out["hidden_states"]):
    np.testing.assert_allclose(np.asarray(o), r.numpy(), atol=TOL, rtol=0)
  if cls == "ViTModel":
    np.testing.assert_allclose(np.asarray(out["last_hidden_state"]),
                               ref.last_hidden_state.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out["pooler_output"]),
                               ref.pooler_output.numpy(), atol=TOL, rtol=0)
    assert "logits" not in out
  else:
    np.testing.assert_allclose(np.asarray(out["logits"]), ref.logits.numpy(),
                               atol=TOL, rtol=0)


def test_bf16_option(tiny_bert):
  model, path = tiny_bert
  ids = np.arange(10).reshape(2, 5)
  with torch.no_grad():
    ref = model(torch.tensor(ids)).last_hidden_state.numpy()
  out = bert.load(path, dtype=jnp.bfloat16)(jnp.asarray(ids))
  assert out["last_hidden_state"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out["last_hidden_state"], np.float32),
                             ref, atol=0.1)


def _tensors(path):
  from detune_jax.io.checkpoints import read_checkpoint
  return dict(read_checkpoint(path).tensors)


def _rewrite(src, dst, tensors, config=None):
  write_model(str(dst), tensors)
  with open(os.path.join(src, "config.json")) as f:
    cfg = json.load(f)
  cfg.update(config or {})
  with open(dst / "config.json", "w") as f:
    json.dump(cfg, f)
  return str(dst)


def test_bad_checkpoints_name_the_tensor(tiny_bert, tmp_path):
  _, path = tiny_bert
  good = _tensors(path)
  name = "encoder.layer.1.attention.self.key.weight"
  missing = {k: v for k, v in good.items() if k != name}
  with pytest.raises(BadInputError, match="missing parameter") as e:
    bert.load(_rewrite(path, tmp_path / "missing", missing))
  assert name in str(e.value)
  extra = dict(good, **{"encoder.layer.9.output.dense.weight": good[name]})
  with pytest.raises(BadInputError, match="extra tensor"):
    bert.load(_rewrite(path, tmp_path / "extra", extra))
  wrong = dict(good, **{name: good[name][:, :5]})
  with pytest.raises(BadInputError, match=r"shape \[32, 5\]") as e:
    bert.load(_rewrite(path, tmp_path / "shape", wrong))
  assert name in str(e.value)
  # a task checkpoint's "bert." prefix is taken off
  prefixed = {"bert." + k: v for k, v in good.items()}
  bert.load(_rewrite(path, tmp_path / "prefixed", prefixed))


@pytest.mark.parametrize("key,value,match", [
    ("model_type", "roberta", "wrong architecture"),
    ("position_embedding_type", "relative_key", "position_embedding_type"),
    ("is_decoder", True, "is_decoder"),
    ("hidden_act", "mish", "hidden_act"),
])
def test_config_the_port_does_not_follow_is_refused(tiny_bert, tmp_path, key,
                                                    value, match):
  _, path = tiny_bert
  bad = _rewrite(path, tmp_path / "bad", _tensors(path), {key: value})
  with pytest.raises(BadInputError, match=match):
    bert.load(bad)


def test_vit_loader_refuses_bert_and_pickles(tiny_bert, tmp_path):
  _, path = tiny_bert
  with pytest.raises(BadInputError, match="wrong architecture"):
    vit.load(path)
  pkl = tmp_path / "pytorch_model.bin"
  pkl.write_bytes(pickle.dumps({"a": 1}))
  with pytest.raises(BadInputError, match="pickle"):
    bert.load(str(pkl), config={"model_type": "bert"})


def test_safetensors_file_loads_with_the_reference_config(tiny_bert):
  model, path = tiny_bert
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  single = os.path.join(path, "model.safetensors")
  ids = jnp.arange(6).reshape(1, 6)
  a = bert.load(single, config=cfg)(ids)["last_hidden_state"]
  b = bert.load(path)(ids)["last_hidden_state"]
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
