"""Where a run's metrics go besides metrics.jsonl and dashboard.html: ``report_to`` as transformers' Trainer
offers it. Each tracker is an optional install, used through its own library; where it would reach a server
its own settings decide (WANDB_MODE=offline, MLFLOW_TRACKING_URI, TRACKIO_DIR).

  tensorboard   event files in output_dir/tensorboard (``tensorboard --logdir output_dir``)
  wandb         a W&B run (project WANDB_PROJECT or "phikit"; its files under output_dir/wandb)
  mlflow        an MLflow run (MLFLOW_TRACKING_URI, else a file store in output_dir/mlruns; experiment
                MLFLOW_EXPERIMENT_NAME or "phikit"), the recipe as its parameters
  trackio       a Trackio run (project TRACKIO_PROJECT or "phikit"; stored locally unless told otherwise)
"""

from __future__ import annotations

import os
from pathlib import Path

from phikit.errors import PhikitError

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny", "trackio": "trackio"}


def _numbers(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    def __init__(self, out: Path, name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, step: int, values: dict) -> None:
        for k, v in _numbers(values).items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, out: Path, name: str, config: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "phikit"), name=name, dir=str(out), config=config)

    def log(self, step: int, values: dict) -> None:
        self.run.log(_numbers(values), step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, out: Path, name: str, config: dict):
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # a local file store, which MLflow 3 keeps behind a flag
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "phikit"))
        self.run = mlflow.start_run(run_name=name)
        mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def log(self, step: int, values: dict) -> None:
        self.mlflow.log_metrics(_numbers(values), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class Trackio:
    def __init__(self, out: Path, name: str, config: dict):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(
            project=os.environ.get("TRACKIO_PROJECT", "phikit"), name=name, config=config, embed=False
        )

    def log(self, step: int, values: dict) -> None:
        self.trackio.log(_numbers(values), step=step)

    def close(self) -> None:
        self.trackio.finish()


CLASSES = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow, "trackio": Trackio}


def check_trackers(names: list[str]) -> None:
    """Unknown names and trackers that are not installed are errors before the run starts."""
    import importlib.util

    for name in names:
        if name not in CLASSES:
            raise PhikitError(f"report_to: unknown tracker {name!r}; use {', '.join(TRACKERS)} or none")
        if importlib.util.find_spec(name) is None:
            raise PhikitError(f"report_to: {name} is not installed: pip install {PACKAGES[name]}")
    if "wandb" in names:
        _check_wandb_login()


def _check_wandb_login() -> None:
    """W&B without credentials (online, no API key, no terminal to ask on) fails in ``wandb.init``, after the
    model has loaded: its own login check runs first (at a terminal it asks for the key there)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):  # logging locally: no key
        return
    import wandb

    try:
        wandb.login(verify=False)
    except wandb.errors.UsageError:
        raise PhikitError(
            "report_to: wandb has no API key: run `wandb login`, set WANDB_API_KEY, or WANDB_MODE=offline to log "
            "locally"
        ) from None


def open_trackers(names: list[str], out: Path, name: str, config: dict) -> list:
    return [CLASSES[n](out, name, config) for n in names]
