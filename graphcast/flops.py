"""Matrix-multiply FLOPs of a traced function, counted through loops.

XLA's own cost analysis counts a loop body once, so a 12-step rollout (a scan) or the
processor's message-passing rounds would be under-counted. Here the jaxpr is walked instead:
each `dot_general` costs 2 * (output elements) * (contracted length); a scan's body counts
`length` times, a conditional its most expensive branch, any other nested jaxpr (jit, remat,
custom derivatives) once per occurrence. Recomputation (remat) is therefore included: compare
with the same function traced without remat to separate model from executed FLOPs.
A `while_loop` with no static trip count is counted once and reported.
"""

import math
from typing import Callable

import jax
from jax.extend import core as jex_core


def dot_flops(eqn) -> int:
    """2 * output elements * contracted length of one dot_general."""
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    contracted = math.prod(lhs_shape[d] for d in lhs_contract)
    return 2 * math.prod(eqn.outvars[0].aval.shape) * contracted


def _sub_jaxprs(value):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def jaxpr_flops(jaxpr, counts: dict) -> int:
    """Matmul FLOPs of `jaxpr` (a core Jaxpr); `counts['while_loops']` gains loops counted once."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += dot_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr, counts)
        elif name == "cond":
            total += max(jaxpr_flops(b.jaxpr, counts) for b in eqn.params["branches"])
        else:
            if name == "while":
                counts["while_loops"] = counts.get("while_loops", 0) + 1
            for value in eqn.params.values():
                for sub in _sub_jaxprs(value):
                    total += jaxpr_flops(sub, counts)
    return total


def matmul_flops(fn: Callable, *args) -> dict:
    """{'flops': matmul FLOPs of `fn(*args)`, 'while_loops': loops counted once}; args may be
    abstract (jax.ShapeDtypeStruct): only tracing happens, nothing is compiled or run."""
    counts = {"while_loops": 0}
    flops = jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr, counts)
    return {"flops": int(flops), **counts}
