"""Files in and out: safetensors models (sharded, memory-mapped), PEFT
adapters, LoWRA Bench parquet, and the orbax progress of a recovery."""

from detune_jax.io.errors import BadInputError
from detune_jax.io.lowra import LowraBench
from detune_jax.io.models import (ModelFiles, check_same_tensors,
                                  output_layout, write_model)
from detune_jax.io.peft import adapter_deltas, merge_adapter
from detune_jax.io.progress import Progress, fingerprint, write_json_atomic
from detune_jax.io.safetensors_io import (SafetensorsFile, SafetensorsWriter,
                                          load_file, save_file)
from detune_jax.io.synthetic import make_lora_models
