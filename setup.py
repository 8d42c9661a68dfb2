"""GraphCast training system: model, ERA5 data pipeline and jaxline experiment."""
import setuptools

setuptools.setup(
    name="graphcast-trainer",
    version="0.1.0",
    description="Train DeepMind's GraphCast weather model: parity model, ERA5 pipeline, jaxline loop.",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["graphcast", "graphcast.*", "data", "data.*",
                                                "training", "training.*", "configs"]),
    py_modules=["experiment"],
    package_data={"graphcast": ["gpu_specs/*.txtpb"]},
    install_requires=[
        "numpy>=2.0",
        "scipy>=1.11",
        "jax>=0.10.2",
        "jaxlib>=0.10.2",
        "dm-haiku>=0.0.17",
        "jraph>=0.0.6.dev0",
        "optax>=0.2.8",
        "ml-collections>=1.1.0",
        "jaxline>=0.0.8",
        "absl-py>=2.0",
        "pandas>=2.0",
        "xarray>=2025.1",
        "dask[array,distributed]>=2025.1",
        "zarr>=3.0",
        "fsspec>=2025.1",
        "gcsfs>=2025.1",
        "google-cloud-storage>=3.0",
        "netCDF4>=1.7",
        "h5netcdf>=1.8",
        "h5py>=3.10",
        "trimesh>=5.0",
        "rtree>=1.3",
        "orbax-checkpoint>=0.12.8",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        # Ahead-of-time compilers for accelerator memory on a CPU-only machine (benchmarks/
        # train_step.py --target); install into a separate virtualenv, pinned to our jax.
        "aot-tpu": ["jax[tpu]==0.10.2"],
        "aot-gpu": ["jax[cuda12]==0.10.2"],
        # chex: tree and shape assertions in the tests only.
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "gcp-storage-emulator>=2026.7.19", "tensorboard>=2.15",
                 "chex>=0.1.90"],
    },
)
