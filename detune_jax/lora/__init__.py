"""LoRA fine-tuning of the Flax ports with optax, written in PEFT's layout.

Builds the fine-tunes the attack recovers from: an adapter on HF-named
weights (:mod:`~detune_jax.lora.adapter`), trained on an offline
classification task (:mod:`~detune_jax.lora.tasks`) by
:func:`train` / :func:`train_many` (one jitted program, vmapped over
fine-tunes), merged (:func:`merge`) or saved for PEFT (:func:`save_peft`).
The library never imports torch or peft.

>>> settings = LoraSettings(rank=16, alpha=32.0)
>>> settings.steps, settings.batch_size
(120, 16)
>>> task = load_task("vader")                                # doctest: +SKIP
>>> data = encode(task, model_dir)                           # doctest: +SKIP
>>> result = train(bert.load(model_dir), settings, data,
...                subset(task, seed=0), task.num_classes)   # doctest: +SKIP
>>> save_peft(result.adapter, settings, "ft_0")              # doctest: +SKIP
"""

from detune_jax.lora.adapter import (ATTENTION, MLP, Adapter, LoraFactors,
                                     LoraSettings, apply_adapter, init_adapter,
                                     merge, rank_of, scale_of, target_names)
from detune_jax.lora.peft_files import peft_config, peft_tensors, save_peft
from detune_jax.lora.tasks import (TASKS, Examples, Split, Task, encode,
                                   load_task, subset, tokenize)
from detune_jax.lora.train import (Encoder, Head, Metrics, TrainResult,
                                   encoder, train, train_many)

__all__ = [
    # Adapters.
    "LoraSettings", "LoraFactors", "Adapter", "ATTENTION", "MLP",
    "target_names", "rank_of", "scale_of", "init_adapter", "apply_adapter",
    "merge",
    # PEFT files.
    "save_peft", "peft_tensors", "peft_config",
    # Tasks.
    "TASKS", "Task", "Split", "Examples", "load_task", "subset", "tokenize",
    "encode",
    # Training.
    "Encoder", "encoder", "Head", "Metrics", "TrainResult", "train",
    "train_many",
]
