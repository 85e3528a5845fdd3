"""Resumable progress of a recovery: an orbax checkpoint per layer group.

``OUT/checkpoint/<g>/`` is the orbax checkpoint (``CheckpointManager`` step
``g``) holding the recovered tensors and diagnostics of layer group ``g``.
``OUT/run.json`` ties the directory to one run (a fingerprint of the inputs
and of the flags that change the result).

Multi-process runs: orbax only writes numpy data from process 0, so the
other processes write each finished group as ``OUT/parts/group_<g>.safetensors``
(atomically); process 0 moves them into the orbax checkpoint when it
assembles the model.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging as py_logging
import os
import re
import threading
from typing import Dict, Optional, Set

import numpy as np

from detune_jax.io.safetensors_io import SafetensorsFile, save_file

RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoint"
PARTS_DIR = "parts"
_PART = re.compile(r"^group_(\d+)\.safetensors$")


def write_json_atomic(path, obj):
  """Writes JSON to ``path + ".tmp"``, fsyncs, then ``os.replace``-s it."""
  tmp = str(path) + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, allow_nan=True, default=str)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_json(path) -> Optional[dict]:
  """The JSON object in ``path``, or None when absent or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def fingerprint(obj) -> str:
  """sha256 of the canonical JSON of ``obj``."""
  raw = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
  return hashlib.sha256(raw.encode()).hexdigest()


def _quiet_orbax():
  # orbax logs every save at INFO through absl; keep it to warnings.
  py_logging.getLogger("absl").addFilter(_OrbaxFilter())


class _OrbaxFilter(py_logging.Filter):
  def filter(self, record):
    return not (record.levelno < py_logging.WARNING and
                "orbax" in (record.pathname or ""))


class Progress:
  """Finished layer groups of one run, in orbax (plus parts, multi-process).

  Args:
    out_dir: the output directory (must exist).
    process_index: this process (0 writes the orbax checkpoint).
  """

  def __init__(self, out_dir, process_index: int = 0):
    # orbax takes about 0.4 s to import, as long as the whole solve of a
    # small model: it is imported beside the work and the checkpoint
    # manager made when first needed (a fresh run needs it at its first
    # save).
    self._importing = threading.Thread(
        target=importlib.import_module, args=("orbax.checkpoint",),
        daemon=True)
    self._importing.start()
    self._manager = None
    self.out_dir = os.path.abspath(str(out_dir))   # orbax wants absolute
    self.process_index = process_index
    self.ckpt_dir = os.path.join(self.out_dir, CHECKPOINT_DIR)
    self.parts_dir = os.path.join(self.out_dir, PARTS_DIR)
    os.makedirs(self.ckpt_dir, exist_ok=True)
    os.makedirs(self.parts_dir, exist_ok=True)

  @property
  def _mgr(self):
    if self._manager is not None:
      return self._manager
    self._importing.join()
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    _quiet_orbax()
    self._ocp = ocp
    process_index = self.process_index
    mp = ocp.options.MultiprocessingOptions(
        primary_host=process_index, active_processes={process_index},
        barrier_sync_key_prefix=f"detune_progress_{process_index}")
    self._manager = ocp.CheckpointManager(
        self.ckpt_dir,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None, create=False, enable_async_checkpointing=False,
            cleanup_tmp_directories=process_index == 0,
            multiprocessing_options=mp),
        item_handlers=ocp.StandardCheckpointHandler(
            multiprocessing_options=mp))
    return self._manager

  def _parts(self) -> Dict[int, str]:
    out = {}
    if not os.path.isdir(self.parts_dir):   # removed once a run finished
      return out
    for f in os.listdir(self.parts_dir):
      m = _PART.match(f)
      if m:
        out[int(m.group(1))] = os.path.join(self.parts_dir, f)
    return out

  def done(self) -> Set[int]:
    """Indices of the groups already finished (by any process)."""
    if self._manager is None and not os.listdir(self.ckpt_dir):
      return set(self._parts())          # a fresh run: nothing in orbax yet
    self._mgr.reload()
    return set(int(s) for s in self._mgr.all_steps()) | set(self._parts())

  def save(self, group: int, tree: Dict[str, np.ndarray]):
    """Saves a finished group: ``{"W.<i>": array, other: array}``.

    Process 0 saves into orbax; other processes write a part file.
    """
    tree = {k: np.asarray(v) for k, v in tree.items()}
    if self.process_index == 0:
      self._mgr.save(group, args=self._ocp.args.StandardSave(tree))
      self._mgr.wait_until_finished()
    else:
      save_file(tree, os.path.join(self.parts_dir,
                                   f"group_{group:06d}.safetensors"))

  def load(self, group: int) -> Dict[str, np.ndarray]:
    """The tree saved for ``group`` (numpy arrays)."""
    parts = self._parts()
    if group in parts and group not in self._mgr.all_steps():
      sf = SafetensorsFile(parts[group])
      return {k: np.array(sf.read(k)) for k in sf.names}
    meta = self._mgr.item_metadata(group)
    target = {k: np.zeros(v.shape, v.dtype) for k, v in meta.items()}
    restored = self._mgr.restore(
        group, args=self._ocp.args.StandardRestore(target))
    return {k: np.asarray(v) for k, v in restored.items()}

  def ingest_parts(self):
    """Process 0: moves the other processes' part files into orbax."""
    steps = set(self._mgr.all_steps())
    for g, path in sorted(self._parts().items()):
      if g not in steps:
        sf = SafetensorsFile(path)
        self.save(g, {k: np.array(sf.read(k)) for k in sf.names})
      os.remove(path)

  def close(self):
    if self._manager is not None:
      self._manager.close()
