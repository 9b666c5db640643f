"""Let ``pipeline.extract(...)`` work although ``pipeline.extract`` is also a module.

Importing a submodule makes it an attribute of its package, which shadows the package's lazy function of
the same name (``pipeline.extract`` becomes the module after its first use). A stage module therefore
calls :func:`callable_module` on itself, so calling the module calls its function.
"""

from __future__ import annotations

import sys
import types


def callable_module(module_name: str, func_name: str) -> None:
    module = sys.modules[module_name]

    class _Stage(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(self, func_name)(*args, **kwargs)

    module.__class__ = _Stage
