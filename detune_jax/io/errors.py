"""The one exception type for bad input files and flags."""

from __future__ import annotations

from typing import Optional


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
