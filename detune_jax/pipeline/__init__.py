"""Whole-model recovery: detect -> group by shape -> batch -> solve -> write.

:func:`recover` takes n fine-tuned models (safetensors files or HF
directories, or the LoRAs of a LoWRA Bench subset) and writes the recovered
base model to ``OUT/model.safetensors`` (sharded like the input), a report
to ``OUT/report.json`` and its progress to an orbax checkpoint under
``OUT/checkpoint`` after every layer group, so that a killed run started
again with the same settings resumes where it stopped.

Steps:

1. Open and check the inputs (names, shapes, dtypes, file integrity, no
   model given twice) and the output directory (``OUT/run.json`` must hold
   the same run fingerprint).
2. Scan: read each tensor of the n models (memory-mapped, one tensor at a
   time). Bit-identical tensors are copied through. A differing tensor of 2+
   dims is a LoRA layer (conv kernels ``[o, i, kh, kw]`` are solved as
   ``[o, i*kh*kw]``); its values must be finite, and with ``rank="auto"`` its
   per-LoRA ranks are estimated (:func:`detune_jax.estimate_rank_details`).
   Two models equal in every tensor are bad input (they add no
   information), found from the tensors as they are compared.
   A differing tensor with fewer than 2 axes once leading size-1 axes are
   dropped (bias, norm, a ViT ``cls_token`` ``[1, 1, d]``) cannot be a LoRA
   update: it is written as the mean of the models and listed under
   ``averaged``. A
   differing non-float tensor is copied from the first model (``first``).
3. Group LoRA layers by (matrix shape, ranks) and cut the groups into batches
   that fit ``max_memory_gb``; each batch is solved at once (vmapped, sharded
   over the local devices by :func:`detune_jax.parallel.solve_layers`).
4. Assemble the output files from the checkpoint and the first model.

Ambiguous rank estimates (``rank="auto"``) follow ``ambiguous_rank``:
``"consistent"`` (default: keep the estimate when, with 3+ models, every
pairwise difference has a rank gap exactly at ``r_i + r_j`` of the per-LoRA
estimate, which is what bf16 releases look like, where rounding noise makes
the gaps weak; otherwise bad input naming the tensor), ``"error"`` (any
ambiguity is bad input), ``"guess"`` (use the estimator's best guess
anyway), ``"mean"`` (treat the tensor as averaged) or an int (use that
rank).

Multi-process (after :func:`initialize_distributed`): every process opens the
inputs, scans a strided share of the tensors (results are all-gathered), then
solves only the layer groups it owns, reading only their tensors. Process 0
saves into the orbax checkpoint; the others write part files that process 0
moves into it, then process 0 writes the model and the report; the others wait
for the report. The output is byte-identical to a one-process run with the
same number of local devices per process (the batches do not depend on the
process count; sharding a batch over a different number of devices, or a
different ``max_memory_gb``, can change the last bits, which is why
``max_memory_gb`` is part of the run fingerprint). All processes must see the
same output directory (a shared filesystem).

One module per stage: :mod:`~detune_jax.pipeline.config` (settings and the
checks that need only them), :mod:`~detune_jax.pipeline.inputs` (opening
the inputs and the output directory), :mod:`~detune_jax.pipeline.plan`
(the scan, the groups and the memory budget),
:mod:`~detune_jax.pipeline.solve`, :mod:`~detune_jax.pipeline.evaluate`,
:mod:`~detune_jax.pipeline.write`, :mod:`~detune_jax.pipeline.report`, the
driver :mod:`~detune_jax.pipeline.run` with its
:mod:`~detune_jax.pipeline.progress_bar`, and the embedded example
(:mod:`~detune_jax.pipeline.example`).

>>> from detune_jax import GridSettings
>>> config = RecoverConfig(models=("ft_0", "ft_1", "ft_2"), output_dir="out",
...                        grid=GridSettings(restarts=0))
>>> config.rank, config.grid.restarts
('auto', 0)
"""

from detune_jax.pipeline.config import (FORMAT_VERSION, KINDS, PLAN_FILE,
                                        RANK_SOURCES, REPORT_FILE,
                                        RecoverConfig, check_config,
                                        grid_options)
from detune_jax.pipeline.evaluate import evaluate_group
from detune_jax.pipeline.example import demo
from detune_jax.pipeline.inputs import (Inputs, check_output_dir,
                                        check_writable, open_inputs,
                                        run_fingerprint)
from detune_jax.pipeline.plan import (Group, TensorPlan, assign_groups,
                                      layer_bytes, make_groups, matrix_shape,
                                      scan)
from detune_jax.pipeline.report import build_report
from detune_jax.pipeline.run import initialize_distributed, recover
from detune_jax.pipeline.solve import solve_group
from detune_jax.pipeline.write import assemble
from detune_jax.solvers.grid import GridSettings

__all__ = [
    "recover", "demo", "initialize_distributed", "RecoverConfig",
    "GridSettings", "check_config", "grid_options", "Inputs", "open_inputs",
    "run_fingerprint", "check_writable", "check_output_dir", "TensorPlan",
    "Group", "scan", "matrix_shape", "layer_bytes", "make_groups",
    "assign_groups", "solve_group", "evaluate_group", "assemble",
    "build_report", "FORMAT_VERSION", "REPORT_FILE", "PLAN_FILE", "KINDS",
    "RANK_SOURCES",
]
