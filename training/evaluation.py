"""Forecast verification: latitude-weighted RMSE, bias, ACC, persistence baseline, skill, figure,
and the evaluation loop that streams forecasts through them.

Conventions (WeatherBench2):
* Latitude weights are proportional to the area of each grid cell (sin of the upper minus sin of the
  lower cell edge, edges half-way between rows and clipped to the poles), normalized to mean 1.
* RMSE: the weighted spatial mean of the squared error is averaged over initial times and the square
  root is taken AFTER that average: rmse = sqrt(mean_t(mean_w(err^2))).
* Bias: mean over initial times of the weighted spatial mean of (forecast - truth).
* ACC: per initial time, the weighted correlation of anomalies from the climatology, then averaged.
* Persistence forecasts the last input frame at every lead time; skill = 1 - rmse / rmse_persistence.

Arrays follow the host batch layout: per variable [B, T, (L), H, W] with H latitude ascending.
"""

import io
import os
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from graphcast.config import TIME_STEP_HOURS
from graphcast.losses import latitude_weights

# Headline metrics for TensorBoard: (variable, level or None) -> short name.
HEADLINE = {("geopotential", 500): "z500", ("temperature", 850): "t850",
            ("2m_temperature", None): "t2m", ("mean_sea_level_pressure", None): "msl",
            ("10m_u_component_of_wind", None): "u10", ("10m_v_component_of_wind", None): "v10",
            ("specific_humidity", 700): "q700"}


class MetricsAccumulator:
    """Streams over evaluation batches and reduces to per (variable, level, lead) metrics."""

    def __init__(self, lat: np.ndarray, levels: Sequence[int], lead_hours: Sequence[int]):
        self._w = latitude_weights(lat)[:, None]  # [H, 1], the training loss's cell areas
        self._levels = tuple(levels)
        self._leads = tuple(int(h) for h in lead_hours)
        self._sums: dict = {}  # (var, level, kind) -> [T] running sum over initial times
        self._count = 0

    def _wmean(self, x: np.ndarray) -> np.ndarray:
        """Area-weighted spatial mean over the last two axes: [B, T, H, W] -> [B, T]."""
        return (x * self._w).mean(axis=(-2, -1))

    def _add(self, key, values: np.ndarray):
        total = values.sum(axis=0)
        self._sums[key] = self._sums.get(key, 0.0) + total

    def add(self, predictions: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
            last_inputs: Optional[Mapping[str, np.ndarray]] = None,
            climatology: Optional[Mapping[str, np.ndarray]] = None) -> None:
        """Adds one batch of forecasts.

        last_inputs: {var: [B, (L), H, W]} last input frame (persistence baseline), optional;
        climatology: {var: broadcastable to the target} (for ACC), optional.
        """
        batch = 0
        for name, truth in targets.items():
            truth = np.asarray(truth, np.float64)
            pred = np.asarray(predictions[name], np.float64)
            if pred.shape != truth.shape:
                raise ValueError(f"Prediction of {name} has shape {pred.shape}, truth {truth.shape}.")
            batch = truth.shape[0]
            persist = clim = None
            if last_inputs is not None and name in last_inputs:
                persist = np.broadcast_to(np.asarray(last_inputs[name], np.float64)[:, None],
                                          truth.shape)
            if climatology is not None and name in climatology:
                clim = np.broadcast_to(np.asarray(climatology[name], np.float64), truth.shape)
            levels = self._levels if truth.ndim == 5 else (None,)
            if truth.ndim not in (4, 5):
                raise ValueError(f"{name}: expected [B, T, (L), H, W], got shape {truth.shape}.")
            for i, level in enumerate(levels):
                pick = (lambda a: a[:, :, i]) if level is not None else (lambda a: a)
                p, t = pick(pred), pick(truth)
                key = (name, level)
                self._add(key + ("se",), self._wmean((p - t) ** 2))
                self._add(key + ("err",), self._wmean(p - t))
                if persist is not None:
                    self._add(key + ("pse",), self._wmean((pick(persist) - t) ** 2))
                if clim is not None and not np.isnan(pick(clim)).any():  # NaN: level not held
                    c = pick(clim)
                    ap, at = p - c, t - c
                    acc = self._wmean(ap * at) / np.sqrt(self._wmean(ap ** 2) * self._wmean(at ** 2))
                    self._add(key + ("acc",), acc)
        self._count += batch

    def result(self) -> dict:
        """{'rmse/<var>[/<level>]/<lead>h': value, ...} plus bias/, acc/, persistence_rmse/, skill/."""
        if not self._count:
            raise ValueError("MetricsAccumulator.result: no evaluation batches were added.")
        out = {}
        for (name, level, kind), total in self._sums.items():
            mean = np.asarray(total) / self._count  # [T]
            for i, lead in enumerate(self._leads[:len(mean)]):
                suffix = f"{name}{'' if level is None else f'/{level}'}/{lead}h"
                if kind == "se":
                    out[f"rmse/{suffix}"] = float(np.sqrt(mean[i]))
                elif kind == "err":
                    out[f"bias/{suffix}"] = float(mean[i])
                elif kind == "pse":
                    out[f"persistence_rmse/{suffix}"] = float(np.sqrt(mean[i]))
                elif kind == "acc":
                    out[f"acc/{suffix}"] = float(mean[i])
        for key in [k for k in out if k.startswith("rmse/")]:
            base = out.get("persistence_" + key)
            if base:
                out["skill/" + key[len("rmse/"):]] = 1.0 - out[key] / base
        return out

    @property
    def num_examples(self) -> int:
        return self._count


def headline(metrics: Mapping[str, float], lead_hours: int) -> dict:
    """Short TensorBoard names for the headline variables at one lead time."""
    out = {}
    for (name, level), short in HEADLINE.items():
        suffix = f"{name}{'' if level is None else f'/{level}'}/{lead_hours}h"
        for kind in ("rmse", "persistence_rmse", "skill", "acc", "bias"):
            if f"{kind}/{suffix}" in metrics:
                out[f"headline/{short}_{kind}_{lead_hours}h"] = metrics[f"{kind}/{suffix}"]
    return out


def _field(arrays: Mapping[str, np.ndarray], name: str, level: Optional[int], levels, lead_index):
    array = np.asarray(arrays[name])[0, lead_index]  # first example
    if level is not None:
        array = array[list(levels).index(level)]
    return array


def forecast_figure(predictions: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                    lat: np.ndarray, lon: np.ndarray, levels: Sequence[int], lead_index: int,
                    lead_hours: int, title: str = "") -> bytes:
    """PNG bytes: prediction, truth and error maps for z500 and t2m (those present) at one lead."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

    rows = [(n, l, s) for n, l, s in (("geopotential", 500, "z500"), ("2m_temperature", None, "t2m"))
            if n in targets and (l is None or l in levels)]
    if not rows:
        raise ValueError("forecast_figure needs geopotential (with level 500) or 2m_temperature "
                         f"among the targets; got {sorted(targets)}.")
    fig, axes = plt.subplots(len(rows), 3, figsize=(12, 3.2 * len(rows)), squeeze=False)
    extent = (float(lon[0]), float(lon[-1]), float(lat[0]), float(lat[-1]))
    for r, (name, level, short) in enumerate(rows):
        pred = _field(predictions, name, level, levels, lead_index)
        truth = _field(targets, name, level, levels, lead_index)
        lo, hi = float(min(pred.min(), truth.min())), float(max(pred.max(), truth.max()))
        err = pred - truth
        bound = float(np.abs(err).max()) or 1.0
        for c, (data, label, kwargs) in enumerate((
                (pred, "prediction", dict(vmin=lo, vmax=hi, cmap="viridis")),
                (truth, "truth", dict(vmin=lo, vmax=hi, cmap="viridis")),
                (err, "error", dict(vmin=-bound, vmax=bound, cmap="RdBu_r")))):
            ax = axes[r, c]
            im = ax.imshow(data, origin="lower", extent=extent, aspect="auto", **kwargs)
            ax.set_title(f"{short} {label} +{lead_hours}h")
            fig.colorbar(im, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def png_to_array(png: bytes) -> np.ndarray:
    """[H, W, 4] uint8 image of PNG bytes (for TensorBoard)."""
    import matplotlib.image  # pylint: disable=import-outside-toplevel
    image = matplotlib.image.imread(io.BytesIO(png), format="png")
    return (np.asarray(image) * 255).round().astype(np.uint8)


def allreduce(accumulator: MetricsAccumulator) -> MetricsAccumulator:
    """Sums the accumulators of all processes (each evaluated its own share of the examples)."""
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_count() == 1:
        return accumulator
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    keys = sorted(accumulator._sums, key=str)  # pylint: disable=protected-access
    flat = np.concatenate([np.ravel(accumulator._sums[k]) for k in keys]  # pylint: disable=protected-access
                          + [np.array([accumulator._count], np.float64)])  # pylint: disable=protected-access
    total = np.asarray(multihost_utils.process_allgather(flat)).sum(axis=0)
    offset = 0
    for k in keys:
        size = np.size(accumulator._sums[k])  # pylint: disable=protected-access
        accumulator._sums[k] = total[offset:offset + size]  # pylint: disable=protected-access
        offset += size
    accumulator._count = int(round(total[-1]))  # pylint: disable=protected-access
    return accumulator


def mean_skill(metrics: Mapping[str, float]) -> float:
    """Mean skill vs persistence over every variable, level and lead (eval's 'best' metric)."""
    values = [v for k, v in metrics.items() if k.startswith("skill/") and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def summary_table(metrics: Mapping[str, float], step: int, lead_hours: Sequence[int]) -> str:
    """Console table: RMSE of the model vs persistence for the headline variables, and the ACC
    where a climatology gave one."""
    with_acc = any(k.startswith("acc/") for k in metrics)
    lines = [f"Evaluation at step {step}: lat-weighted RMSE (model / persistence, skill)"
             + (", ACC" if with_acc else "")]
    for (name, level), short in HEADLINE.items():
        cells = []
        for lead in lead_hours:
            suffix = f"{name}{'' if level is None else f'/{level}'}/{lead}h"
            if f"rmse/{suffix}" not in metrics:
                continue
            model = metrics[f"rmse/{suffix}"]
            base = metrics.get(f"persistence_rmse/{suffix}")
            acc = metrics.get(f"acc/{suffix}")
            cells.append(f"+{lead}h {model:.4g}" + (f" / {base:.4g} ({1 - model / base:+.0%})"
                                                     if base else "")
                         + (f" ACC {acc:.3f}" if acc is not None else ""))
        if cells:
            lines.append(f"  {short:>5}: " + "; ".join(cells))
    return "\n".join(lines)


def verify_forecasts(predict: Callable[[dict], dict], batches: Iterable[dict], lat: np.ndarray,
                     levels: Sequence[int], lead_hours: Sequence[int],
                     climatology: Optional["Climatology"] = None) -> tuple:
    """The evaluation loop. Each batch (host layout [local_devices, per_device, ...] with
    `init_time`) is forecast by `predict(batch) -> predictions` in the same layout and verified
    against its targets, persistence and, when given, the climatology.

    Returns (the accumulator summed over all processes, (predictions, targets) of the first
    batch for the figure, or None without batches)."""
    accumulator = MetricsAccumulator(lat, levels, lead_hours)
    first = None
    flat = lambda tree: {k: np.reshape(v, (-1,) + v.shape[2:]) for k, v in tree.items()}
    for batch in batches:
        init_times = batch.pop("init_time")
        preds, targets, inputs = flat(predict(batch)), flat(batch["targets"]), flat(batch["inputs"])
        last_inputs = {k: v[:, -1] for k, v in inputs.items() if k in targets}
        clim = climatology.at(np.ravel(init_times), lead_hours) if climatology else None
        accumulator.add(preds, targets, last_inputs, clim)
        if first is None:
            first = (preds, targets)
    return allreduce(accumulator), first


def write_figure(first: tuple, lat: np.ndarray, lon: np.ndarray, levels: Sequence[int],
                 lead_index: int, step: int, out_dir: str, writer=None) -> None:
    """Writes the first batch's forecast maps at lead step `lead_index` as
    `out_dir/step_<step>.png`, and to `writer`'s images when it takes images."""
    from absl import logging  # pylint: disable=import-outside-toplevel
    png = forecast_figure(first[0], first[1], lat, lon, levels, lead_index,
                          TIME_STEP_HOURS * (lead_index + 1), title=f"step {step}")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"step_{step:08d}.png")
    with open(path, "wb") as f:
        f.write(png)
    logging.info("Wrote %s.", path)
    if writer is not None and hasattr(writer, "write_images"):
        writer.write_images(step, {"forecast": png_to_array(png)})


class Climatology:
    """A climatology store (WeatherBench2 layout: dims dayofyear 1..366, hour, [level,] latitude,
    longitude), local or gs://, on the model's grid.

    A climatology on a grid k times finer than the model's is brought to it the way the data are
    (every k-th point); any other grid is a GridMismatchError. Targets or levels it lacks get no
    ACC (logged).
    `at(init_times, lead_hours)` returns the values at every forecast's valid time, for ACC.
    """

    def __init__(self, url: str, task_config, lat: np.ndarray, lon: np.ndarray,
                 storage_options: Optional[dict] = None):
        from absl import logging  # pylint: disable=import-outside-toplevel
        from data import sources, validate  # pylint: disable=import-outside-toplevel
        ds = sources.open_raw(url, storage_options=storage_options)
        ds = ds.rename({k: v for k, v in sources.RENAMES.items() if k in ds.variables})
        missing_dims = [d for d in ("dayofyear", "hour", "lat", "lon") if d not in ds.dims]
        if missing_dims:
            raise validate.DimensionError(
                f"Climatology {url} has no {missing_dims} dimension(s) (dims {dict(ds.sizes)}); "
                "expected WeatherBench2's layout: dayofyear, hour, [level,] latitude, longitude.")
        names = [v for v in task_config.target_variables if v in ds.data_vars]
        absent = [v for v in task_config.target_variables if v not in ds.data_vars]
        if not names:
            raise validate.MissingVariablesError(
                f"Climatology {url} holds none of the target variables "
                f"{list(task_config.target_variables)} (it has {sorted(ds.data_vars)}).")
        if absent:
            logging.warning("Climatology %s has no %s: no ACC for them.", url, absent)
        if any("level" in ds[v].dims for v in names):
            levels = list(task_config.pressure_levels)
            have = [int(x) for x in ds["level"].values] if "level" in ds.coords else []
            absent = [x for x in levels if x not in have]
            if len(absent) == len(levels):
                raise validate.MissingLevelsError(
                    f"Climatology {url} has none of the task's pressure levels {levels} "
                    f"(it has {have}).")
            if absent:
                logging.warning("Climatology %s has no pressure levels %s: no ACC there.",
                                url, absent)
            ds = ds.assign_coords(level=np.asarray(have)).reindex(level=levels)  # NaN if absent
        ds = ds[names]
        if validate.check_latitude(ds["lat"].values, url) < 0:
            ds = ds.isel(lat=slice(None, None, -1))
        if validate.check_longitude(ds["lon"].values, url):
            ds = ds.assign_coords(lon=ds["lon"].values % 360).sortby("lon")
        spacing = abs(float(lat[1] - lat[0]))
        ds = sources.subsample(ds, spacing, f"climatology {url}")
        if not (np.allclose(ds["lat"].values, lat, atol=1e-3)
                and np.allclose(ds["lon"].values, lon, atol=1e-3)):
            raise validate.GridMismatchError(
                f"Climatology {url} is on another grid than the model's: latitudes "
                f"{float(ds['lat'][0]):g}..{float(ds['lat'][-1]):g}, longitudes from "
                f"{float(ds['lon'][0]):g} after taking every k-th point; the model's grid has "
                f"{float(lat[0]):g}..{float(lat[-1]):g} and {float(lon[0]):g}.")
        self.url = url
        self._ds = ds
        self._doy = {int(d): i for i, d in enumerate(ds["dayofyear"].values)}
        self._hour = {int(h): i for i, h in enumerate(ds["hour"].values)}

    def _position(self, valid: "np.datetime64") -> tuple:
        import pandas as pd  # pylint: disable=import-outside-toplevel
        from data import validate  # pylint: disable=import-outside-toplevel
        t = pd.Timestamp(valid)
        if t.day_of_year not in self._doy or t.hour not in self._hour:
            raise validate.DataValidationError(f"Climatology {self.url} has no entry for valid time {t} (day of year "
                             f"{t.day_of_year}, hour {t.hour}); it has days of year "
                             f"{min(self._doy)}..{max(self._doy)} and hours {sorted(self._hour)}.")
        return self._doy[t.day_of_year], self._hour[t.hour]

    def at(self, init_times: np.ndarray, lead_hours: Sequence[int]) -> dict:
        """{var: [B, T, (L), H, W]} float32 at valid times init_time + lead (day of year and hour
        of each valid time); each distinct (day, hour) is read once."""
        valid = np.add.outer(np.asarray(init_times, "datetime64[ns]"),
                             np.array(lead_hours, "timedelta64[h]"))
        positions = [self._position(v) for v in valid.ravel()]
        fields = {}
        for key in dict.fromkeys(positions):
            frame = self._ds.isel(dayofyear=key[0], hour=key[1]).load()
            fields[key] = {name: np.asarray(frame[name].transpose(
                *([d for d in ("level",) if d in frame[name].dims] + ["lat", "lon"])).values,
                np.float32) for name in frame.data_vars}
        return {name: np.stack([fields[k][name] for k in positions]).reshape(
            valid.shape + fields[positions[0]][name].shape) for name in self._ds.data_vars}
