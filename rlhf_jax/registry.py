"""Name -> record tables: how a config string finds its loss, algorithm, reward or data source.

A registry is filled at import by the module that defines the records (a testbed
registers its own); lookups name the config field and the known names when they fail.
"""

from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """A table of named records of one kind, e.g. `Registry("RL algorithm", "config.rl.algorithm")`."""

  def __init__(self, kind: str, field: str, hint: str = ""):
    self.kind, self.field, self.hint = kind, field, hint
    self._records: dict[str, T] = {}

  def register(self, name: str, record: T) -> T:
    """Adds `record` under `name`; a second record under the same name is an error."""
    if name in self._records:
      raise ValueError(f"{self.kind} {name!r} is registered twice")
    self._records[name] = record
    return record

  def get(self, name: str, field: str | None = None) -> T:
    """The record named `name`; ValueError naming `field` and the known names otherwise."""
    if name not in self._records:
      hint = f" ({self.hint})" if self.hint else ""
      raise ValueError(f"{field or self.field}: unknown {self.kind} {name!r}; known: "
                       f"{', '.join(sorted(self._records))}{hint}")
    return self._records[name]

  def names(self) -> tuple[str, ...]:
    return tuple(sorted(self._records))

  def __contains__(self, name: str) -> bool:
    return name in self._records

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())
