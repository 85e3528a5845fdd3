"""The one exception type for bad input files and flags."""

from __future__ import annotations

import sys
from typing import List, Optional


class BadInputError(ValueError):
  """Input that cannot be recovered from; ``str()`` is one line.

  Attributes:
    file: the file (or directory, or flag) at fault.
    tensor: the tensor name, when one is at fault.
    message: what is wrong.

  >>> str(BadInputError("ft_1/model.safetensors", "non-finite values",
  ...                   tensor="q.weight"))
  "ft_1/model.safetensors: tensor 'q.weight': non-finite values"
  """

  def __init__(self, file, message: str, tensor: Optional[str] = None):
    self.file = str(file)
    self.tensor = tensor
    self.message = " ".join(str(message).split())
    super().__init__(self.__str__())

  def __str__(self):
    where = self.file
    if self.tensor is not None:
      where += f": tensor {self.tensor!r}"
    return f"{where}: {self.message}"


def parse_flags(argv: List[str]) -> List[str]:
  """absl ``app.run(main, flags_parser=parse_flags)``: a flag that does not
  parse (unknown, malformed, out of bounds) is bad input like a bad file:
  exit status 2 and one line, ``error: <what absl says>``, instead of absl's
  usage dump and status 1. ``--help``/``--helpfull`` behave as in absl."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write("error: " + " ".join(str(e).split()) + "\n")
    sys.stderr.flush()
    sys.exit(2)
