"""An inert torchvision, so that timm imports where torchvision cannot be installed.

timm imports torchvision at import time for its data pipeline and a few layers
that neither the benchmark nor the PyTorch-weights tests call (they build a
model and feed it tensors). PyPI has no CPU build of torchvision and the CUDA
build does not load beside CPU torch, so without a working torchvision every
`torchvision.*` import gets a stand-in whose names are inert placeholder
classes; any real use of one fails loudly. One copy, for the bench worker and
tests/models/test_torch_weights.py.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types


class _Placeholder(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"torchvision stand-in: {cls.__name__} is not available")


class _StandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] != "torchvision":
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _StandIn(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def install() -> None:
    """Put the stand-in on `sys.meta_path` unless a real torchvision imports (once)."""
    if any(isinstance(finder, _Finder) for finder in sys.meta_path):
        return
    try:
        import torchvision  # noqa: F401

        return
    except (ImportError, RuntimeError):
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
    sys.meta_path.insert(0, _Finder())


def active() -> bool:
    """Whether `torchvision` is this stand-in (a real one is not)."""
    return isinstance(sys.modules.get("torchvision"), _StandIn)
