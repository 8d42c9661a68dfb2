"""Time and size one GraphCast training step (loss, gradients, AdamW update).

    python benchmarks/train_step.py --resolution 1.0 --levels 13 --mesh-size 4 --latent 64 \
        --msg-steps 4 --hidden-layers 1 --batch 1 --ar-steps 1 --iters 5 [--bf16] [--json]

`--compile-only` lowers and compiles with abstract parameters and batch, so full-size
configurations can be sized on a small machine (XLA's memory analysis: temp, argument,
output bytes). Random data and unit statistics: the figures depend only on shapes.
"""

import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from graphcast import config as config_lib
from graphcast import memory
from graphcast import rollout


def bench_task(levels: int) -> config_lib.TaskConfig:
    return dataclasses.replace(config_lib.TASK_13, pressure_levels=config_lib.PRESSURE_LEVELS[levels])


def matmul_flops(fn, *args) -> float:
    """2*M*N*K summed over every matrix product (dot_general) of `fn`'s jaxpr, scan bodies counted
    `length` times and rematerialized code once per execution as traced (the recomputation shows
    up in the backward pass). Element-wise work is left out: a lower bound dominated by the edge
    and node MLPs. (XLA's cost analysis counts a scan body once, whatever its length.)"""

    def count(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (lhs_contract, _), _ = eqn.params["dimension_numbers"]
                k = np.prod([eqn.invars[0].aval.shape[d] for d in lhs_contract])
                total += 2.0 * k * np.prod(eqn.outvars[0].aval.shape)
            factor = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
            subs = [v for v in eqn.params.values() if hasattr(v, "eqns") or hasattr(v, "jaxpr")]
            if eqn.primitive.name == "cond":
                total += max(count(b.jaxpr) for b in eqn.params["branches"])
                continue
            for sub in subs:
                total += factor * count(sub.jaxpr if hasattr(sub, "jaxpr") else sub)
        return total

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=float, default=1.0)
    p.add_argument("--levels", type=int, default=13, choices=sorted(config_lib.PRESSURE_LEVELS))
    p.add_argument("--mesh-size", type=int, default=4)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--msg-steps", type=int, default=4)
    p.add_argument("--hidden-layers", type=int, default=1)
    p.add_argument("--radius-fraction", type=float, default=0.6)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ar-steps", type=int, default=1)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--remat", choices=["none", "steps", "blocks", "steps+blocks"],
                   default="steps+blocks", help="rematerialization policy: per autoregressive step, "
                   "per message-passing round and row block (remat_blocks), both, or none")
    p.add_argument("--block-size", type=int, default=16384,
                   help="process grid<->mesh edges and grid nodes in blocks of at most this many "
                   "rows (0: whole arrays)")
    p.add_argument("--plain", action="store_true",
                   help="concatenate-then-multiply edge MLPs (the reference's formulation)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--graph-cache-dir", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    model_config = config_lib.ModelConfig(
        resolution=args.resolution, mesh_size=args.mesh_size, latent_size=args.latent,
        gnn_msg_steps=args.msg_steps, hidden_layers=args.hidden_layers,
        radius_query_fraction_edge_length=args.radius_fraction)
    task = bench_task(args.levels)
    lat = np.linspace(-90, 90, int(round(180 / args.resolution)) + 1, dtype=np.float32)
    lon = np.arange(0, 360, args.resolution, dtype=np.float32)
    t0 = time.perf_counter()
    predictor = rollout.Predictor(model_config, task, memory.unit_stats(task), lat, lon,
                                  bf16=args.bf16,
                                  remat_steps="steps" in args.remat,
                                  remat_blocks="blocks" in args.remat,
                                  block_size=args.block_size or None,
                                  split_first_layer=not args.plain,
                                  graph_cache_dir=args.graph_cache_dir)
    graph_s = time.perf_counter() - t0

    optimizer = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1)
    t0 = time.perf_counter()
    compiled, abstract_batch, abstract_params = memory.compile_train_step(
        predictor, batch=args.batch, ar_steps=args.ar_steps, optimizer=optimizer)
    compile_s = time.perf_counter() - t0
    result = {
        "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params))),
        "graph_build_s": graph_s,
        "compile_s": compile_s,
        **memory.memory_report(compiled),
        "matmul_flops": matmul_flops(memory.train_step_fn(predictor, optimizer), abstract_params,
                                     jax.eval_shape(optimizer.init, abstract_params),
                                     abstract_batch),
        "config": vars(args),
    }
    if not args.compile_only:
        rng = np.random.default_rng(0)
        batch = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32)),
                             abstract_batch)
        params = predictor.init(jax.random.PRNGKey(0), batch)
        opt_state = optimizer.init(params)
        params, opt_state, loss = compiled(params, opt_state, batch)  # warm-up
        loss.block_until_ready()
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            params, opt_state, loss = compiled(params, opt_state, batch)
            loss.block_until_ready()
            times.append(time.perf_counter() - t0)
        result.update(step_s_median=statistics.median(times), step_s_min=min(times),
                      loss=float(loss))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value}")


if __name__ == "__main__":
    main()
