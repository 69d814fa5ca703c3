"""Hub kernels (the `kernels` package) switched off inside petkit's checkpointed blocks.

transformers >= 5.25 depends on `kernels`, and with it installed decorates classes such as
`LlamaAttention` with `kernels.use_kernelized_func`: the class's forward becomes a wrapper that,
on every call, stores the module's private kernel functions in a module-global variable and
resets it afterwards. Under `torch.compile` that store is a mutation of an object outside the
traced function, which activation checkpointing (a higher-order op) cannot trace: each
checkpointed block breaks the graph ("HOP: Unsafe side effect ... CompileableContextVar").

For a module that was never kernelized (`kernels.kernelize`, transformers' `use_kernels=True`)
the wrapper routes calls to the very functions the unwrapped forward calls, so running the
unwrapped forward (`__wrapped__`, kept by `functools.wraps`) computes the same thing without
the global store. A kernelized module keeps its wrapper: its kernels are the user's choice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from types import MethodType

from torch import nn


def _plain_forward(module: nn.Module) -> MethodType | None:
    """The unwrapped forward of a module under an unused `use_kernelized_func` wrapper; None
    when the module has no such wrapper, was kernelized, or has a forward of its own."""
    funcs = vars(module).get("_kernel_funcs")  # set by the wrapper's __init__, one per function
    inner = getattr(type(module).forward, "__wrapped__", None)
    if not isinstance(funcs, dict) or inner is None or "forward" in vars(module):
        return None
    if any("forward" in vars(func) for func in funcs.values()):  # kernelize() set a kernel
        return None
    return MethodType(inner, module)


@contextlib.contextmanager
def plain_forwards(blocks: Iterable[nn.Module]) -> Iterator[int]:
    """Inside the context, every module in `blocks` under an unused hub-kernels wrapper runs its
    unwrapped forward; yields how many were switched. Restored afterwards."""
    switched = []
    for block in blocks:
        for module in block.modules():
            plain = _plain_forward(module)
            if plain is not None:
                module.forward = plain
                switched.append(module)
    try:
        yield len(switched)
    finally:
        for module in switched:
            del module.forward
