"""What `evaluate.py` does: a metric (or the denoising panel) of a trained model's EMA params."""

import json
import os
import time

import jax

from jaxdiff import errors, images, metric_writer, parallel, storage
from jaxdiff.metric_writer import MetricWriter
from jaxdiff.evaluation import metrics, panels
from jaxdiff.jobs import cli
from jaxdiff.jobs import sample as sample_job
from jaxdiff.jobs import workdir as workdir_lib


def check_request(output: str | None, **counts) -> None:
  """errors.UsageError, before any model loads, for a count flag (`counts`: name=value) below 1
  or an --output (a file to write) that is a folder or lies under an existing file."""
  sample_job.check_positive(**counts)
  if output is None:
    return
  if storage.isdir(output):
    raise errors.UsageError(f"--output={output}: is a folder; name the file to write")
  sample_job.check_folder("output", output, os.path.dirname(storage.resolve(output)))


def run(workdir: str, metric: str, sampling: dict | None = None, *,
        checkpoint_step: int | None = None, seed: int = 0, dtype: str | None = None,
        num_samples: int | None = None, num_images: int | None = None,
        variance: str = "beta", output: str | None = None) -> tuple[dict, str]:
  """`metrics.evaluate` on the EMA params of a training workdir (or an export), on this host's
  devices, with the network computing in `dtype` (None: as trained). Sample metrics sample as
  the model's own `config.eval` says, overridden by `sampling` (the flags given). The result,
  which also names the checkpoint, dataset, dtype and device count, is written to `output`
  (default WORKDIR/eval/METRIC_STEP.json) and as a row to the model's metric sinks beside it
  (`config.train.metric_sinks`); returns (result, the JSON file's path). SIGTERM or Ctrl-C stops
  it before its next batch of samples, writing nothing (`cli.stoppable`)."""
  sample_job.check_dtype(dtype)
  cli.check_sampling_flags(sampling or {})
  with cli.stoppable() as stop:  # nothing is written until every batch is drawn
    trained = workdir_lib.load_model(workdir, checkpoint_step)
    config = trained.config
    with cli.naming_flags():
      metrics.check_metric(metric, config.data, trained.denoiser.process.name)
      denoiser = trained.denoiser.computing_in(dtype)
      request = metrics.Request(sampling=cli.sampling_options(config.eval, sampling or {}),
                                num_samples=num_samples, num_images=num_images,
                                variance=variance, should_stop=stop.should_stop)
    mesh = parallel.make_mesh(jax.local_devices())
    start = time.perf_counter()
    with cli.naming_flags():
      result = metrics.evaluate(metric, denoiser, trained.params, config.data, mesh,
                                jax.random.key(seed), request)
    result = {**result, "checkpoint_step": trained.step, "dataset": config.data.dataset,
              "seed": seed, "dtype": denoiser.dtype, "devices": mesh.devices.size,
              "seconds": time.perf_counter() - start}
    output = storage.resolve(output or storage.join(workdir, "eval",
                                                    f"{metric}_{trained.step:07d}.json"))
    storage.write_text(output, json.dumps(result, indent=2))
    writer = MetricWriter(os.path.dirname(output),
                          config.train.get("metric_sinks", metric_writer.DEFAULT_SINKS))
    try:
      writer.write(trained.step, metrics.scalars_of(metric, result))
    finally:
      writer.close()
    return result, output


def format_table(result: dict) -> str:
  """A two-column text table of a result's scalars (lists and long values left to the JSON)."""
  rows = [(name, f"{value:.6g}" if isinstance(value, float) else str(value))
          for name, value in result.items() if not isinstance(value, (list, dict))]
  width = max(len(name) for name, _ in rows)
  return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def write_panel(workdir: str, output_path: str, checkpoint_step: int | None = None,
                seed: int = 0, dtype: str | None = None) -> str:
  """The panel of a trained workdir's EMA params, the network computing in `dtype` (None: as
  trained), as a PNG (needs the dataset for x0)."""
  sample_job.check_dtype(dtype)
  trained = workdir_lib.load_model(workdir, checkpoint_step)
  x0, noise = panels.panel_inputs(trained.config.data, jax.random.key(seed))
  image = panels.panel(trained.denoiser.computing_in(dtype), trained.params, x0, noise)
  images.save_png(output_path, image)
  return storage.resolve(output_path)
