"""Safetensors files read lazily (memory-mapped) and written atomically.

The format is parsed here rather than with ``safetensors.safe_open`` so that
bfloat16 / float8 tensors come back as numpy arrays (via ``ml_dtypes``), and
so that a truncated or corrupt file is reported with the tensor at fault.

Layout: 8 bytes little-endian header length ``N``, ``N`` bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}``, then the data; offsets are relative to the end of the header.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import ml_dtypes
import numpy as np

from detune_jax.io.errors import BadInputError

DTYPES: Dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
MAX_HEADER_BYTES = 100 * 1024 * 1024


def dtype_name(dtype) -> str:
  """Safetensors name (``"BF16"``, ...) of a numpy dtype."""
  dtype = np.dtype(dtype)
  if dtype not in _NAMES:
    raise ValueError(f"dtype {dtype} cannot be stored in safetensors")
  return _NAMES[dtype]


class TensorInfo(NamedTuple):
  """Where one tensor lives.

  Attributes:
    name: tensor name.
    dtype: safetensors dtype name, e.g. ``"BF16"``.
    shape: tuple of ints.
    file: path of the file holding it.
    begin: byte offset of its data from the start of the file.
    nbytes: size of its data.
  """
  name: str
  dtype: str
  shape: Tuple[int, ...]
  file: str
  begin: int
  nbytes: int


class SafetensorsFile:
  """One ``.safetensors`` file: header parsed and checked, data memory-mapped.

  Args:
    path: the file.

  Raises:
    BadInputError: missing, truncated or corrupt file (naming the tensor when
      one is at fault).
  """

  def __init__(self, path):
    self.path = str(path)
    if not os.path.isfile(self.path):
      raise BadInputError(self.path, "no such file")
    self.size = os.path.getsize(self.path)
    if self.size < 8:
      raise BadInputError(self.path, f"not a safetensors file (only "
                          f"{self.size} bytes)")
    with open(self.path, "rb") as f:
      n = struct.unpack("<Q", f.read(8))[0]
      if n > MAX_HEADER_BYTES or 8 + n > self.size:
        raise BadInputError(self.path, f"corrupt or truncated safetensors "
                            f"file: header of {n} bytes in a file of "
                            f"{self.size} bytes")
      raw = f.read(n)
    self.header_bytes = raw
    self.data_start = 8 + n
    try:
      header = json.loads(raw.decode("utf-8"))
      if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
      raise BadInputError(self.path, f"corrupt safetensors header ({e})")
    meta = header.pop("__metadata__", None)
    if meta is None:
      meta = {}
    if not (isinstance(meta, dict) and
            all(isinstance(v, str) for v in meta.values())):
      raise BadInputError(self.path, "corrupt safetensors header: "
                          "__metadata__ must map strings to strings")
    self.metadata: Dict[str, str] = dict(meta)
    self.tensors: Dict[str, TensorInfo] = {}
    for name, entry in header.items():
      self.tensors[name] = self._entry(name, entry)
    # Names in data order (the layout of the file).
    self.names: List[str] = sorted(self.tensors,
                                   key=lambda k: self.tensors[k].begin)
    self._check_offsets()
    self._mmap = None

  def _entry(self, name, entry) -> TensorInfo:
    def ints(x, n=None):
      return (isinstance(x, list) and (n is None or len(x) == n) and
              all(isinstance(v, int) and not isinstance(v, bool) for v in x))

    if not isinstance(entry, dict):
      raise BadInputError(self.path, "corrupt header entry (not an object)",
                          tensor=name)
    for key in ("dtype", "shape", "data_offsets"):
      if key not in entry:
        raise BadInputError(self.path, f"corrupt header entry ({key} "
                            "missing)", tensor=name)
    dtype = entry["dtype"]
    if not ints(entry["shape"]):
      raise BadInputError(self.path, f"corrupt header entry (shape "
                          f"{entry['shape']!r} is not a list of ints)",
                          tensor=name)
    if not ints(entry["data_offsets"], 2):
      raise BadInputError(self.path, f"corrupt header entry (data_offsets "
                          f"{entry['data_offsets']!r} are not two ints)",
                          tensor=name)
    shape = tuple(entry["shape"])
    b, e = entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
      raise BadInputError(self.path, f"unsupported dtype {dtype!r}",
                          tensor=name)
    if any(s < 0 for s in shape) or b < 0 or e < b:
      raise BadInputError(self.path, "corrupt header entry (negative size)",
                          tensor=name)
    want = math.prod(shape) * DTYPES[dtype].itemsize
    if e - b != want:
      raise BadInputError(self.path, f"corrupt header: {e - b} bytes for "
                          f"shape {list(shape)} {dtype} ({want} expected)",
                          tensor=name)
    if self.data_start + e > self.size:
      raise BadInputError(self.path, f"truncated file: data ends at byte "
                          f"{self.data_start + e} but the file has "
                          f"{self.size}", tensor=name)
    return TensorInfo(name, dtype, shape, self.path, self.data_start + b,
                      e - b)

  def _check_offsets(self):
    """Tensors must tile the data from its start, without overlap or gap
    (as the safetensors library checks: "invalid offset")."""
    pos, prev = 0, None
    for name in sorted(self.names, key=lambda k: (self.tensors[k].begin,
                                                  self.tensors[k].nbytes)):
      info = self.tensors[name]
      b = info.begin - self.data_start
      if b != pos:
        what = (f"overlaps tensor {prev!r}" if b < pos else
                f"leaves a gap of {b - pos} bytes after "
                f"{repr(prev) if prev else 'the header'}")
        raise BadInputError(self.path, f"corrupt header: data_offsets "
                            f"[{b}, {b + info.nbytes}] {what}", tensor=name)
      pos, prev = b + info.nbytes, name

  def read(self, name: str) -> np.ndarray:
    """A read-only memory-mapped view of tensor ``name`` (no copy)."""
    info = self.tensors[name]
    dtype = DTYPES[info.dtype]
    if info.nbytes == 0:
      return np.zeros(info.shape, dtype)
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    buf = self._mmap[info.begin:info.begin + info.nbytes]
    return np.asarray(buf).view(dtype).reshape(info.shape)

  def read_bytes(self, name: str) -> memoryview:
    """The raw little-endian bytes of tensor ``name``."""
    info = self.tensors[name]
    if info.nbytes == 0:
      return memoryview(b"")
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    return memoryview(self._mmap[info.begin:info.begin + info.nbytes])

  def identity(self, samples: int = 16, block: int = 4096) -> dict:
    """A cheap identity: resolved path, size, header hash and sampled data
    blocks (the samples alone miss most changes in a large file; the path
    tells apart files of the same size and header elsewhere)."""
    h = hashlib.sha256()
    data = self.size - self.data_start
    with open(self.path, "rb") as f:
      for i in range(samples if data > 0 else 0):
        f.seek(self.data_start + (data * i) // samples)
        h.update(f.read(block))
    return {"path": os.path.realpath(self.path), "size": self.size,
            "header": hashlib.sha256(self.header_bytes).hexdigest(),
            "sample": h.hexdigest()}

  def close(self):
    self._mmap = None


def _header(specs: Sequence[Tuple[str, str, Tuple[int, ...]]],
            metadata: Optional[Dict[str, str]]):
  header, offsets, pos = {}, {}, 0
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  for name, dtype, shape in specs:
    n = math.prod(shape) * DTYPES[dtype].itemsize
    header[name] = {"dtype": dtype, "shape": list(shape),
                    "data_offsets": [pos, pos + n]}
    offsets[name] = (pos, n)
    pos += n
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * ((-len(raw)) % 8)
  return raw, offsets, pos


class SafetensorsWriter:
  """Writes one safetensors file in any tensor order, then renames it in place.

  The header (and so the layout) is fixed up front from ``specs``; tensors are
  written at their offsets into ``path + ".tmp"`` and :meth:`commit`
  fsyncs and ``os.replace``-s it, so ``path`` is either absent, the old file,
  or complete.

  Args:
    path: final path.
    specs: ``(name, dtype_name, shape)`` in file order.
    metadata: optional ``__metadata__`` strings.
  """

  def __init__(self, path, specs, metadata=None):
    self.path = str(path)
    self.tmp = self.path + ".tmp"
    specs = [(n, d, tuple(int(x) for x in s)) for n, d, s in specs]
    self.specs = {n: (d, s) for n, d, s in specs}
    raw, self._offsets, total = _header(specs, metadata)
    self._base = 8 + len(raw)
    self._pending = {n for n, _, _ in specs}
    self._f = open(self.tmp, "wb")
    self._f.write(struct.pack("<Q", len(raw)))
    self._f.write(raw)
    self._f.truncate(self._base + total)

  def write(self, name: str, array):
    """Writes tensor ``name`` (cast to its dtype, shape must match)."""
    dtype, shape = self.specs[name]
    a = np.asarray(array)
    if a.shape != shape:
      raise ValueError(f"{name}: shape {a.shape} != {shape}")
    a = np.ascontiguousarray(a.astype(DTYPES[dtype], copy=False))
    self.write_bytes(name, memoryview(a.reshape(-1).view(np.uint8)))

  def write_bytes(self, name: str, data):
    """Writes the raw bytes of tensor ``name``."""
    pos, n = self._offsets[name]
    if len(data) != n:
      raise ValueError(f"{name}: {len(data)} bytes, expected {n}")
    self._f.seek(self._base + pos)
    self._f.write(data)
    self._pending.discard(name)

  def commit(self):
    """Checks every tensor was written, fsyncs and renames into place."""
    if self._pending:
      self.abort()
      raise ValueError(f"{self.path}: tensors never written: "
                       f"{sorted(self._pending)[:5]}")
    self._f.flush()
    os.fsync(self._f.fileno())
    self._f.close()
    os.replace(self.tmp, self.path)

  def abort(self):
    """Drops the temporary file."""
    if not self._f.closed:
      self._f.close()
    if os.path.exists(self.tmp):
      os.remove(self.tmp)


def save_file(tensors: Dict[str, np.ndarray], path, metadata=None):
  """Writes ``{name: array}`` to ``path`` atomically (any dtype incl. bf16).

  >>> import os, tempfile, ml_dtypes
  >>> path = os.path.join(tempfile.mkdtemp(), "a.safetensors")
  >>> save_file({"w": np.ones((2, 3), ml_dtypes.bfloat16)}, path)
  >>> SafetensorsFile(path).read("w").dtype
  dtype(bfloat16)
  """
  specs = [(k, dtype_name(np.asarray(v).dtype), np.shape(v))
           for k, v in tensors.items()]
  w = SafetensorsWriter(path, specs, metadata)
  try:
    for k, v in tensors.items():
      w.write(k, v)
  except BaseException:
    w.abort()
    raise
  w.commit()


def load_file(path) -> Dict[str, np.ndarray]:
  """Reads every tensor of ``path`` into memory (small files, tests)."""
  f = SafetensorsFile(path)
  return {k: np.array(f.read(k)) for k in f.names}
