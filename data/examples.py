"""Training/eval examples from an internal-layout dataset: one import for the pieces.

splits (date splits, valid initial times), windows (one example's arrays, frame cache), batches
(host slice of each global batch, device axes, prefetch), train_iterator (shuffled epochs and
their resume state), eval_iterator (one chronological pass).

Timing: python -m data.examples --source DIR/era5_sample.zarr [--batches 10 --batch-size 8
        --step-seconds 0.5]
"""

import argparse
import time as time_lib

from data.batches import BatchStream
from data.eval_iterator import EvalIterator
from data.splits import DEFAULT_SPLITS, SIX_HOURS, split_bounds, valid_init_times
from data.train_iterator import TrainIterator
from data.windows import FrameReader, example_bytes
from graphcast import config

__all__ = ["BatchStream", "DEFAULT_SPLITS", "EvalIterator", "FrameReader", "SIX_HOURS",
           "TrainIterator", "example_bytes", "split_bounds", "valid_init_times"]


def main(argv=None) -> None:
    """Prints examples/s through TrainIterator with and without prefetch."""
    parser = argparse.ArgumentParser(description="Example throughput (printed, not asserted).")
    parser.add_argument("--source", required=True, help="zarr / netCDF readable by data.sources")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-steps", type=int, default=1)
    parser.add_argument("--levels", type=int, default=13)
    parser.add_argument("--step-seconds", type=float, default=0.0,
                        help="simulated training step per batch (shows the overlap)")
    args = parser.parse_args(argv)
    from data import sources
    task = config.task_on_levels(args.levels)
    ds = sources.open_source(args.source, task_config=task)
    for prefetch in (0, 2):
        with TrainIterator(ds, task, num_steps=args.num_steps, split=(None, None),
                           global_batch_size=args.batch_size, process_index=0, process_count=1,
                           local_device_count=1, prefetch=prefetch, cache_bytes=0) as it:
            it.next()   # warm-up (opens chunks, starts threads)
            began = time_lib.perf_counter()
            for _ in range(args.batches):
                it.next()
                time_lib.sleep(args.step_seconds)
            rate = args.batches * args.batch_size / (time_lib.perf_counter() - began)
        print(f"prefetch={prefetch}: {rate:.1f} examples/s ({args.batch_size} per batch, "
              f"{args.num_steps} steps, {args.step_seconds} s simulated step)")


if __name__ == "__main__":
    main()
