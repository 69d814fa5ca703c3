"""One rank-r product for the LoRA layers that read the same input, in compiled graphs.

In a transformer block q, k and v read the same normed hidden states, and so do the MLP's gate
and up projections. Each of their LoRA layers forms h_i = x A_i^T, a GEMM of 16 output columns
that reads all of x (N, d): three reads of x where one would do, and in the backward three more
for dA_i = g_i^T x and three input-gradient GEMMs g_i A_i, each writing an (N, d) result that
autograd then adds up. With the factors side by side,

    h = x [A_1; A_2; A_3]^T               one read of x;  h_i = h[:, columns of i]
    dA = g^T x,   dx = g [A_1; A_2; A_3]  with g = [g_1 | g_2 | g_3]: one GEMM each

the same values in a third of the rank-r GEMMs over x. `fuse_shared_input_linears` does this
to the graph dynamo captured, before autograd is traced (inductor's `pre_grad_custom_pass`, run
on every compiled graph and on the checkpointed blocks' subgraphs): it groups `F.linear(x, W)`
calls with one input `x`, no bias, and a weight that is trained and has at most `MAX_ROWS` rows
(the low-rank factors; the frozen base weights are never concatenated, which would copy them
every step). `shared_input_lowrank()` installs it while graphs compile; training runs do so
while `run_modes.SHARED_INPUT_LOWRANK` is on (the default: with the in-place B-product of
`core.accumulate`, the 1.1B LoRA step's median process on an H100 went from 69,663 to 76,906
tok/s, 2026-12-07).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

MAX_ROWS = 256  # a weight with more rows is not a low-rank factor (LoRA's r is far below)
_LINEARS = (F.linear, torch._C._nn.linear)


def _operands(node: fx.Node) -> tuple[Any, ...]:
    """(input, weight, bias) of an `F.linear` call node, positional or keyword."""
    return tuple(node.args[i] if len(node.args) > i else node.kwargs.get(name)
                 for i, name in enumerate(("input", "weight", "bias")))


def _factor_linear(node: fx.Node) -> bool:
    """`F.linear(x, W)` with no bias and W a trained matrix of at most MAX_ROWS rows."""
    if node.op != "call_function" or node.target not in _LINEARS:
        return False
    x, weight, bias = _operands(node)
    if bias is not None or not isinstance(weight, fx.Node) or not isinstance(x, fx.Node):
        return False
    value = weight.meta.get("example_value")
    return (isinstance(value, torch.Tensor) and value.requires_grad and value.dim() == 2
            and value.shape[0] <= MAX_ROWS)


def _defined_before(graph: fx.Graph, node: fx.Node, later: fx.Node) -> bool:
    for other in graph.nodes:
        if other is node:
            return True
        if other is later:
            return False
    return False


def fuse_shared_input_linears(graph: fx.Graph) -> int:
    """Rewrite each group of two or more factor linears with one input into one linear over
    their concatenated weights and a split of its output; returns how many groups it fused."""
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        if _factor_linear(node):
            groups.setdefault(_operands(node)[0], []).append(node)
    fused = 0
    for x, linears in groups.items():
        first = linears[0]
        weights = [_operands(n)[1] for n in linears]
        dtypes = {w.meta["example_value"].dtype for w in weights}
        if len(linears) < 2 or len(dtypes) > 1 \
                or not all(_defined_before(graph, w, first) for w in weights):
            continue
        rows = [w.meta["example_value"].shape[0] for w in weights]
        with graph.inserting_before(first):
            stacked = graph.call_function(torch.cat, (weights,), {"dim": 0})
            stacked.meta["example_value"] = torch.cat([w.meta["example_value"] for w in weights])
            h = graph.call_function(F.linear, (x, stacked))
            h.meta["example_value"] = F.linear(x.meta["example_value"], stacked.meta["example_value"])
            parts = graph.call_function(torch.split, (h, rows), {"dim": -1})
            parts.meta["example_value"] = torch.split(h.meta["example_value"], rows, dim=-1)
            for i, node in enumerate(linears):
                piece = graph.call_function(operator.getitem, (parts, i))
                piece.meta["example_value"] = parts.meta["example_value"][i]
                node.replace_all_uses_with(piece)
        for node in linears:
            graph.erase_node(node)
        fused += 1
    if fused:
        graph.lint()
    return fused


@contextlib.contextmanager
def shared_input_lowrank() -> Iterator[None]:
    """Graphs compiled inside take `fuse_shared_input_linears` before their own pre-grad passes'
    end (alongside any custom pass already set)."""
    import torch._inductor.config as inductor_config

    present = inductor_config.pre_grad_custom_pass
    earlier = list(present) if isinstance(present, (list, tuple)) else [present] if present else []

    def passes(graph: fx.Graph) -> None:  # one callable: torch 2.11 takes no list here
        for each in earlier:
            each(graph)
        fuse_shared_input_linears(graph)

    with inductor_config.patch(pre_grad_custom_pass=passes):
        yield
