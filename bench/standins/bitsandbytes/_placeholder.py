"""The inert pieces of the ``bitsandbytes`` stand-in: placeholders that can be looked up, tested for truth and
subclassed, but never called, and classes that cannot be built."""

from __future__ import annotations

STANDIN = True


class StandInError(RuntimeError):
    """Raised by anything in the stand-in that would have to compute: the benchmark never takes that path."""


class Placeholder:
    """An attribute of the stand-in. Falsy; attribute access gives further placeholders; calling raises."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Placeholder(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise StandInError(f"{self._name} was called, but bitsandbytes here is the benchmark's stand-in "
                           "(bench/standins): only 16-bit paths can run")

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<stand-in {self._name}>"


def placeholder_attribute(module: str):
    """A module-level ``__getattr__``: any name the module does not define is a ``Placeholder``."""

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Placeholder(f"{module}.{attr}")

    return __getattr__


class Unbuildable:
    """Base of the stand-in's classes: ``isinstance`` checks work (and match nothing), building one raises."""

    def __init__(self, *args, **kwargs):
        raise StandInError(f"{type(self).__name__} cannot be built: bitsandbytes here is the benchmark's stand-in")

    def forward(self, *args, **kwargs):  # some loaders wrap forward methods of every class they find
        raise StandInError(f"{type(self).__name__}.forward: bitsandbytes here is the benchmark's stand-in")
