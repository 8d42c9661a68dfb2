"""Time and size one GraphCast training step: the experiment's update (graphcast.update).

    python benchmarks/train_step.py --resolution 1.0 --levels 13 --mesh-size 4 --latent 64 \
        --msg-steps 4 --hidden-layers 1 --batch 1 --ar-steps 1 --iters 5 [--bf16] [--json]

`--compile-only` lowers and compiles with abstract parameters and batch, so full-size
configurations can be sized on a small machine (XLA's memory analysis: temp, argument,
output bytes). `--target tpu-v4|tpu-v5p|h100|a100` compiles for that accelerator instead of
this machine's CPU (ahead of time, no hardware; needs the `aot-tpu` / `aot-gpu` extra) and
implies `--compile-only`; a step XLA refuses for lack of device memory is reported as
`"total_bytes": null` with XLA's reason in `refused`. Matmul FLOPs are counted from the traced step through its loops:
`model_flops` without rematerialization, `executed_flops` with it. Random data and unit
statistics: the figures depend only on shapes.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from graphcast import config as config_lib
from graphcast import flops
from graphcast import memory
from graphcast import rollout
from graphcast import targets
from graphcast import update


def step_flops(predictor: rollout.Predictor, direction, abstract_args) -> dict:
    """Matmul FLOPs of the update: executed (with the predictor's remat) and model (without)."""
    executed = flops.matmul_flops(update.update_fn(predictor, direction), *abstract_args)
    plain = rollout.Predictor(predictor.model_config, predictor.task_config, predictor.stats,
                              predictor.grid_lat, predictor.grid_lon, bf16=predictor.bf16,
                              remat_steps=False, remat_blocks=False,
                              block_size=predictor.block_size,
                              split_first_layer=predictor.split_first_layer,
                              graphs=predictor.graphs)
    model = flops.matmul_flops(update.update_fn(plain, direction), *abstract_args)
    return {"model_flops": model["flops"], "executed_flops": executed["flops"],
            "flops_while_loops_counted_once": executed["while_loops"]}


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
    p.add_argument("--offload-windows", action="store_true",
                   help="keep each step's saved input window in host memory (with step remat)")
    p.add_argument("--host-batch", action="store_true",
                   help="keep the batch in host memory; each step copies what it reads to the device")
    p.add_argument("--recompute-grid", action="store_true",
                   help="keep no grid-sized latent for the backward pass: the grid nodes' path "
                   "is recomputed per row block (needs blocks remat and a block size)")
    p.add_argument("--block-size", type=int, default=16384,
                   help="process grid<->mesh edges and grid nodes in blocks of at most this many "
                   "rows (0: whole arrays)")
    p.add_argument("--plain", action="store_true",
                   help="concatenate-then-multiply edge MLPs (the reference's formulation)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--target", choices=sorted(targets.TARGETS), default="cpu",
                   help="compile for this device's compiler and memory model (ahead of time)")
    p.add_argument("--gpu-spec-dir", default=None,
                   help="directory of XLA GPU spec files <card>.txtpb (h100, a100 targets; default: "
                   "graphcast/gpu_specs)")
    p.add_argument("--graph-cache-dir", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.offload_windows and "steps" not in args.remat:
        p.error("--offload-windows needs step remat (--remat steps or steps+blocks).")
    if args.recompute_grid and not ("blocks" in args.remat and args.block_size):
        p.error("--recompute-grid needs blocks remat (--remat blocks or steps+blocks) and "
                "--block-size > 0.")
    if args.target != "cpu":
        args.compile_only = True
    try:
        device = targets.target_device(args.target, args.gpu_spec_dir)
    except (ValueError, targets.MissingExtraError) as e:
        p.error(str(e))

    model_config = config_lib.ModelConfig(
        resolution=args.resolution, mesh_size=args.mesh_size, latent_size=args.latent,
        gnn_msg_steps=args.msg_steps, hidden_layers=args.hidden_layers,
        radius_query_fraction_edge_length=args.radius_fraction)
    task = config_lib.task_on_levels(args.levels)
    lat = np.linspace(-90, 90, int(round(180 / args.resolution)) + 1, dtype=np.float32)
    lon = np.arange(0, 360, args.resolution, dtype=np.float32)
    t0 = time.perf_counter()
    predictor = rollout.Predictor(model_config, task, memory.unit_stats(task), lat, lon,
                                  bf16=args.bf16,
                                  remat_steps="steps" in args.remat,
                                  remat_blocks="blocks" in args.remat,
                                  offload_windows=args.offload_windows,
                                  host_batch=args.host_batch,
                                  block_size=args.block_size or None,
                                  split_first_layer=not args.plain,
                                  recompute_grid=args.recompute_grid,
                                  graph_cache_dir=args.graph_cache_dir)
    graph_s = time.perf_counter() - t0

    direction = update.make_direction()
    abstract_args = memory.abstract_step_args(predictor, direction, args.batch, args.ar_steps)
    abstract_params, _, abstract_batch, _ = abstract_args
    t0 = time.perf_counter()
    try:
        compiled, _ = memory.compile_train_step(predictor, batch=args.batch,
                                                ar_steps=args.ar_steps, direction=direction,
                                                device=device)
        sizes = memory.memory_report(compiled)
    except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses a step that cannot fit
        if "RESOURCE_EXHAUSTED" not in str(e) or not args.compile_only:
            raise
        sizes = {"total_bytes": None, "refused": str(e).strip().splitlines()[0][:1000]}
    compile_s = time.perf_counter() - t0
    result = {
        "target": args.target,
        "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params))),
        "graph_build_s": graph_s,
        "compile_s": compile_s,
        **sizes,
        "device_memory_bytes": targets.device_memory_bytes(args.target),
        **step_flops(predictor, direction, abstract_args),
        "config": vars(args),
    }
    if not args.compile_only:
        rng = np.random.default_rng(0)
        batch = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32)),
                             abstract_batch)
        params = predictor.init(jax.random.PRNGKey(0), batch)
        opt_state = direction.init(params)
        lr = jnp.float32(1e-3)
        params, opt_state, scalars = compiled(params, opt_state, batch, lr)  # warm-up
        scalars["loss"].block_until_ready()
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            params, opt_state, scalars = compiled(params, opt_state, batch, lr)
            scalars["loss"].block_until_ready()
            times.append(time.perf_counter() - t0)
        result.update(step_s_median=statistics.median(times), step_s_min=min(times),
                      loss=float(scalars["loss"]))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value}")


if __name__ == "__main__":
    main()
