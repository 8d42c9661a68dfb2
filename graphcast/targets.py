"""Ahead-of-time compile targets: an accelerator's device without the accelerator.

`jax.experimental.topologies` describes a TPU slice (with the `libtpu` of `pip install
-e ".[aot-tpu]"`) or an NVIDIA GPU (with the CUDA plugin of `pip install -e ".[aot-gpu]"`); a
function placed on one of its devices compiles with that backend's compiler and memory model,
on a CPU-only machine. Only compilation is possible: nothing runs.
"""

import importlib.util
import os
from typing import Optional

import jax
from jax.experimental import topologies

GIB = 2 ** 30
GPU_SPEC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs")

# name -> (platform, topology settings, device memory in bytes)
TARGETS = {
    "cpu": ("cpu", {}, None),
    "tpu-v4": ("tpu", {"topology_name": "v4:2x2x1", "chip_config_name": "megacore",
                       "chips_per_host_bounds": (2, 2, 1), "num_slices": 1}, 32 * GIB),
    "tpu-v5p": ("tpu", {"topology_name": "v5p:2x2x1", "chip_config_name": "megacore",
                        "chips_per_host_bounds": (2, 2, 1), "num_slices": 1}, 95 * GIB),
    "h100": ("cuda", {"spec": "h100_sxm"}, 80 * 10 ** 9),
    "a100": ("cuda", {"spec": "a100_sxm_40"}, 40 * 10 ** 9),
}

_EXTRA = {"tpu": ("aot-tpu", "libtpu"), "cuda": ("aot-gpu", "jax_plugins.xla_cuda12")}


class MissingExtraError(RuntimeError):
    """The compiler for a target is not installed."""


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def compiler_installed(name: str) -> bool:
    """Whether the compiler for target `name` is installed (always, for "cpu")."""
    platform = TARGETS[name][0]
    return platform == "cpu" or _has_module(_EXTRA[platform][1])


def device_memory_bytes(name: str) -> Optional[int]:
    """The target's device memory (None for the host CPU)."""
    return TARGETS[name][2]


def target_device(name: str, gpu_spec_dir: Optional[str] = None):
    """A device of target `name` to compile for (the first local CPU device for "cpu").

    GPU targets read XLA's GPU spec for the card (`<spec>.txtpb`, a GpuTargetConfigProto) from
    `gpu_spec_dir`, by default the specs shipped in graphcast/gpu_specs. Raises ValueError for an unknown name, MissingExtraError naming the pip
    extra when the target's compiler is not installed."""
    if name not in TARGETS:
        raise ValueError(f"Unknown target {name!r}; expected one of {sorted(TARGETS)}.")
    platform, settings, _ = TARGETS[name]
    if platform == "cpu":
        return jax.devices("cpu")[0]
    extra, module = _EXTRA[platform]
    if not compiler_installed(name):
        raise MissingExtraError(
            f"Target {name!r} needs the {platform.upper()} compiler ({module}), which is not "
            f"installed: pip install -e \".[{extra}]\" (into a separate virtualenv: it must not "
            f"change the JAX that tests use; see README, 'Accelerator memory').")
    if platform == "tpu":
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        return topologies.get_topology_desc(platform="tpu", **settings).devices[0]
    path = os.path.join(gpu_spec_dir or GPU_SPEC_DIR, settings["spec"] + ".txtpb")
    if not os.path.exists(path):
        raise ValueError(f"Target {name!r}: GPU spec file {path} does not exist.")
    with open(path) as f:
        config = f.read()
    return topologies.get_topology_desc(platform="cuda", target_config=config,
                                        topology="1x1x1").devices[0]
