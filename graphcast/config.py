"""Model and task configuration, variable groups, standard tasks and task validation.

`ModelConfig` and `TaskConfig` keep the field names and order of the official
checkpoint format. `TaskConfig` validates itself at construction so that a task
which could never train fails before any data is read or anything compiles.
"""

import dataclasses
import math
from typing import Iterable, Mapping, Optional, Sequence

import pandas as pd

# Pressure-level sets (hPa).
PRESSURE_LEVELS_WEATHERBENCH_13 = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)
PRESSURE_LEVELS_HRES_25 = (1, 2, 3, 5, 7, 10, 20, 30, 50, 70, 100, 150, 200, 250, 300, 400, 500,
                           600, 700, 800, 850, 900, 925, 950, 1000)
PRESSURE_LEVELS_ERA5_37 = (1, 2, 3, 5, 7, 10, 20, 30, 50, 70, 100, 125, 150, 175, 200, 225, 250,
                           300, 350, 400, 450, 500, 550, 600, 650, 700, 750, 775, 800, 825, 850,
                           875, 900, 925, 950, 975, 1000)
PRESSURE_LEVELS = {13: PRESSURE_LEVELS_WEATHERBENCH_13, 25: PRESSURE_LEVELS_HRES_25,
                   37: PRESSURE_LEVELS_ERA5_37}

# Names with a pressure-level axis; decides how many output channels a target takes.
ALL_ATMOSPHERIC_VARS = (
    "potential_vorticity", "specific_rain_water_content", "specific_snow_water_content",
    "geopotential", "temperature", "u_component_of_wind", "v_component_of_wind",
    "specific_humidity", "vertical_velocity", "vorticity", "divergence", "relative_humidity",
    "ozone_mass_mixing_ratio", "specific_cloud_liquid_water_content",
    "specific_cloud_ice_water_content", "fraction_of_cloud_cover",
)
TARGET_SURFACE_VARS = ("2m_temperature", "mean_sea_level_pressure", "10m_v_component_of_wind",
                       "10m_u_component_of_wind", "total_precipitation_6hr")
TARGET_SURFACE_NO_PRECIP_VARS = TARGET_SURFACE_VARS[:4]
TARGET_ATMOSPHERIC_VARS = ("temperature", "geopotential", "u_component_of_wind",
                           "v_component_of_wind", "vertical_velocity", "specific_humidity")
TARGET_ATMOSPHERIC_NO_W_VARS = tuple(v for v in TARGET_ATMOSPHERIC_VARS if v != "vertical_velocity")
TISR = "toa_incident_solar_radiation"
EXTERNAL_FORCING_VARS = (TISR,)
# Progress features, derived from the timestamps (and longitude): the fractions and their
# sin/cos; the model reads only the sin/cos.
YEAR_PROGRESS = "year_progress"
DAY_PROGRESS = "day_progress"
PROGRESS_VARS = tuple(f"{base}{suffix}" for base in (YEAR_PROGRESS, DAY_PROGRESS)
                      for suffix in ("", "_sin", "_cos"))
GENERATED_FORCING_VARS = tuple(v for v in PROGRESS_VARS if v.endswith(("_sin", "_cos")))
FORCING_VARS = EXTERNAL_FORCING_VARS + GENERATED_FORCING_VARS
STATIC_VARS = ("geopotential_at_surface", "land_sea_mask")

# Variables known to vary in time: an input among these must be fed back, so it has
# to be a target or a forcing. Unknown names are checked against the data instead.
KNOWN_TIME_DEPENDENT_VARS = frozenset(
    ALL_ATMOSPHERIC_VARS + TARGET_SURFACE_VARS + FORCING_VARS
    + (YEAR_PROGRESS, DAY_PROGRESS, "total_precipitation", "sea_surface_temperature"))

# GraphCast's per-variable loss weights; every other target weighs 1.0.
GRAPHCAST_LOSS_WEIGHTS = {
    "2m_temperature": 1.0,
    "10m_u_component_of_wind": 0.1,
    "10m_v_component_of_wind": 0.1,
    "mean_sea_level_pressure": 0.1,
    "total_precipitation_6hr": 0.1,
}

# One model step: the spacing of input frames, of target lead times and of the differences
# whose spread normalizes the residual targets.
TIME_STEP_HOURS = 6
TIME_STEP = pd.Timedelta(hours=TIME_STEP_HOURS)


class TaskConfigError(ValueError):
    """A TaskConfig that cannot be trained or run; the message says what to change."""


class MissingLevelsError(KeyError):
    """Pressure levels the task needs are absent from a dataset, statistics or climatology.

    A KeyError, as selecting the levels would raise; data and statistics raise subclasses
    (`data.validate.MissingLevelsError`, `normalization.MissingStatsLevelsError`) so that the
    tools' exit status tells the two apart.
    """

    def __str__(self) -> str:  # the message itself, not KeyError's quoted repr
        return str(self.args[0]) if self.args else ""


def check_pressure_levels(available: Iterable[int], required: Sequence[int], where: str,
                          error: type = MissingLevelsError) -> None:
    """Raises `error` (a MissingLevelsError) naming the levels of `required` (hPa) absent
    from `available`, and those available; `where` names the data, e.g. file and variable."""
    have = [int(x) for x in available]
    missing = [int(p) for p in required if int(p) not in have]
    if missing:
        raise error(f"{where}: pressure levels {missing} hPa required by the task "
                    f"(pressure_levels {[int(p) for p in required]}) are missing; "
                    f"available levels: {have}.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Network hyper-parameters, in the field order of the official checkpoints."""
    resolution: float
    mesh_size: int
    latent_size: int
    gnn_msg_steps: int
    hidden_layers: int
    radius_query_fraction_edge_length: float
    mesh2grid_edge_normalization_factor: Optional[float] = None

    def __post_init__(self):
        for name in ("mesh_size", "latent_size", "gnn_msg_steps", "hidden_layers"):
            value = getattr(self, name)
            if int(value) != value or value < (0 if name == "mesh_size" else 1):
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}.")
        if not self.radius_query_fraction_edge_length > 0:
            raise ValueError("ModelConfig.radius_query_fraction_edge_length must be > 0, got "
                             f"{self.radius_query_fraction_edge_length!r}.")


def _duplicates(names) -> list:
    seen, dups = set(), []
    for n in names:
        if n in seen and n not in dups:
            dups.append(n)
        seen.add(n)
    return dups


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """What the model reads and predicts. The first five fields are the official ones.

    `loss_weights` overrides GraphCast's per-variable weights (only for targets); it is
    not part of the checkpoint format.
    """
    input_variables: tuple
    target_variables: tuple
    forcing_variables: tuple
    pressure_levels: tuple
    input_duration: str
    loss_weights: Optional[Mapping[str, float]] = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        for name in ("input_variables", "target_variables", "forcing_variables", "pressure_levels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "pressure_levels", tuple(int(p) for p in self.pressure_levels))
        self._validate()

    def _validate(self):
        if not self.target_variables:
            raise TaskConfigError("TaskConfig.target_variables is empty: name at least one variable "
                                  "to predict.")
        for field in ("input_variables", "target_variables", "forcing_variables", "pressure_levels"):
            dups = _duplicates(getattr(self, field))
            if dups:
                raise TaskConfigError(f"TaskConfig.{field} lists {dups} more than once; "
                                      "remove the repeats.")
        both = sorted(set(self.target_variables) & set(self.forcing_variables))
        if both:
            raise TaskConfigError(
                f"{both} appear in both TaskConfig.target_variables and forcing_variables: a variable "
                "is either predicted (target) or supplied from outside (forcing); remove it from one.")
        fed_back = set(self.target_variables) | set(self.forcing_variables)
        for name in self.input_variables:
            if name in KNOWN_TIME_DEPENDENT_VARS and name not in fed_back:
                raise TaskConfigError(
                    f"Input variable {name!r} changes with time but is neither a target nor a forcing, "
                    "so it cannot be fed back autoregressively. Either add it to "
                    f"TaskConfig.target_variables (the model predicts it) or to forcing_variables "
                    "(you supply it at every target time).")
        if any(p <= 0 for p in self.pressure_levels):
            raise TaskConfigError(f"TaskConfig.pressure_levels must be positive hPa values, got "
                                  f"{self.pressure_levels}.")
        atmospheric = [v for v in self.target_variables + self.input_variables
                       if v in ALL_ATMOSPHERIC_VARS]
        if atmospheric and not self.pressure_levels:
            raise TaskConfigError(f"Atmospheric variables {sorted(set(atmospheric))} need "
                                  "TaskConfig.pressure_levels; none are given.")
        try:
            duration = pd.Timedelta(self.input_duration)
        except (ValueError, TypeError) as e:
            raise TaskConfigError(f"TaskConfig.input_duration={self.input_duration!r} is not a "
                                  "duration; use e.g. '12h'.") from e
        if duration <= pd.Timedelta(0) or duration % TIME_STEP != pd.Timedelta(0):
            raise TaskConfigError(f"TaskConfig.input_duration={self.input_duration!r} must be a "
                                  f"positive multiple of {TIME_STEP_HOURS}h (e.g. "
                                  f"'{2 * TIME_STEP_HOURS}h' for two input frames).")
        if self.loss_weights is not None:
            unknown = sorted(set(self.loss_weights) - set(self.target_variables))
            if unknown:
                raise TaskConfigError(f"TaskConfig.loss_weights gives weights for {unknown}, which are "
                                      "not targets; remove them or add them to target_variables.")

    @property
    def num_input_frames(self) -> int:
        """Number of input frames one TIME_STEP apart, e.g. 2 for '12h'."""
        return int(pd.Timedelta(self.input_duration) // TIME_STEP)

    def variable_loss_weights(self) -> dict:
        """Per-target loss weights: the override if given, else GraphCast's for present targets."""
        weights = {v: GRAPHCAST_LOSS_WEIGHTS.get(v, 1.0) for v in self.target_variables}
        if self.loss_weights is not None:
            weights.update({k: float(w) for k, w in self.loss_weights.items()})
        return weights

    def level_shape(self, name: str) -> tuple:
        """`(L,)` for a variable on the task's pressure levels, `()` for a surface one."""
        return (len(self.pressure_levels),) if name in ALL_ATMOSPHERIC_VARS else ()

    def channels(self, name: str) -> int:
        """Channels `name` takes per time step: one per pressure level, or one."""
        return math.prod(self.level_shape(name))

    def num_input_channels(self) -> int:
        """Channels the data gives each grid node: every input frame (statics once), then the
        forcings at the target time. The encoder adds the grid's structural features."""
        frames = self.num_input_frames
        inputs = sum(self.channels(v) * (1 if v in STATIC_VARS else frames)
                     for v in self.input_variables)
        return inputs + sum(self.channels(v) for v in self.forcing_variables)

    def num_outputs(self) -> int:
        """Output channels of the decoder: one per surface target, one per level otherwise."""
        return sum(self.channels(v) for v in self.target_variables)

    def official_fields(self) -> dict:
        """The five fields the official checkpoint format stores, in order."""
        return {f: getattr(self, f) for f in
                ("input_variables", "target_variables", "forcing_variables", "pressure_levels",
                 "input_duration")}


TASK = TaskConfig(
    input_variables=TARGET_SURFACE_VARS + TARGET_ATMOSPHERIC_VARS + FORCING_VARS + STATIC_VARS,
    target_variables=TARGET_SURFACE_VARS + TARGET_ATMOSPHERIC_VARS,
    forcing_variables=FORCING_VARS,
    pressure_levels=PRESSURE_LEVELS_ERA5_37,
    input_duration="12h",
)
TASK_13 = dataclasses.replace(TASK, pressure_levels=PRESSURE_LEVELS_WEATHERBENCH_13)
TASK_13_PRECIP_OUT = TaskConfig(
    input_variables=(TARGET_SURFACE_NO_PRECIP_VARS + TARGET_ATMOSPHERIC_VARS + FORCING_VARS
                     + STATIC_VARS),
    target_variables=TARGET_SURFACE_VARS + TARGET_ATMOSPHERIC_VARS,
    forcing_variables=FORCING_VARS,
    pressure_levels=PRESSURE_LEVELS_WEATHERBENCH_13,
    input_duration="12h",
)
STANDARD_TASKS = {"TASK": TASK, "TASK_13": TASK_13, "TASK_13_PRECIP_OUT": TASK_13_PRECIP_OUT}


def task_on_levels(num_levels: int) -> TaskConfig:
    """GraphCast's TASK variables on the standard pressure-level set with `num_levels` levels."""
    if num_levels not in PRESSURE_LEVELS:
        raise TaskConfigError(f"{num_levels} pressure levels: choose one of "
                              f"{sorted(PRESSURE_LEVELS)} (graphcast.config.PRESSURE_LEVELS).")
    return dataclasses.replace(TASK, pressure_levels=PRESSURE_LEVELS[num_levels])
