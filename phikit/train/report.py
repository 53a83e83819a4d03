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

import json
import os
from pathlib import Path

from phikit.errors import PhikitError, first_line

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny", "trackio": "trackio"}


def _numbers(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# Each tracker: (out, name, config, resumed) -> log(step, values), close(failed). ``resumed``: the step a
# resumed run goes on from (None: a new run); its tracker's run continues (TensorBoard drops what was logged
# past that step; W&B and MLflow reopen the run whose id ``RUN_IDS`` kept) instead of a second run beside it.
RUN_IDS = "trackers.json"  # in output_dir: the W&B and MLflow run of this output folder


def _run_ids(out: Path) -> dict:
    """tracker -> the id of this output folder's run ({} where none was kept, or the file is unreadable)."""
    try:
        ids = json.loads((out / RUN_IDS).read_text())
    except (OSError, ValueError):
        return {}
    return ids if isinstance(ids, dict) else {}


def _keep_run_id(out: Path, tracker: str, run_id: str) -> None:
    from phikit.checkpoint import atomic_write

    ids = {**_run_ids(out), tracker: run_id}
    atomic_write(out / RUN_IDS, lambda tmp: tmp.write_text(json.dumps(ids)))


class TensorBoard:
    def __init__(self, out: Path, name: str, config: dict, resumed: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=None if resumed is None else resumed + 1)

    def log(self, step: int, values: dict) -> None:
        for k, v in _numbers(values).items():
            self.writer.add_scalar(k, v, step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandB:
    def __init__(self, out: Path, name: str, config: dict, resumed: int | None = None):
        import wandb

        run_id = _run_ids(out).get("wandb") if resumed is not None else None
        project = os.environ.get("WANDB_PROJECT", "phikit")
        resume = {"id": run_id, "resume": "allow"} if run_id else {}
        self.run = wandb.init(project=project, name=name, dir=str(out), config=config, **resume)
        _keep_run_id(out, "wandb", self.run.id)

    def log(self, step: int, values: dict) -> None:
        self.run.log(_numbers(values), step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MLflow:
    def __init__(self, out: Path, name: str, config: dict, resumed: int | None = None):
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # a local file store, which MLflow 3 keeps behind a flag
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "phikit"))
        run_id = _run_ids(out).get("mlflow") if resumed is not None else None
        try:
            self.run = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=name)
        except mlflow.exceptions.MlflowException:  # the run is not in this store (another tracking URI): a new one
            run_id = None
            self.run = mlflow.start_run(run_name=name)
        _keep_run_id(out, "mlflow", self.run.info.run_id)
        if not run_id:
            mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def log(self, step: int, values: dict) -> None:
        self.mlflow.log_metrics(_numbers(values), step=step)

    def close(self, failed: bool = False) -> None:
        self.mlflow.end_run(status="KILLED" if failed else "FINISHED")


class Trackio:
    def __init__(self, out: Path, name: str, config: dict, resumed: int | None = None):
        import trackio

        self.trackio = trackio
        project = os.environ.get("TRACKIO_PROJECT", "phikit")
        # Trackio resumes a run by its name, which other output folders may share: a resumed run is its own
        name = name if resumed is None else f"{name} (from step {resumed})"
        self.run = trackio.init(project=project, name=name, config=config, embed=False)

    def log(self, step: int, values: dict) -> None:
        self.trackio.log(_numbers(values), step=step)

    def close(self, failed: bool = False) -> None:
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


def open_trackers(names: list[str], out: Path, name: str, config: dict, resumed: int | None = None) -> list:
    """The trackers of ``names``, started; one that cannot start (a server out of reach, a refused key) is a
    one-line error, the ones already started closed as failed."""
    opened: list = []
    for n in names:
        try:
            opened.append(CLASSES[n](out, name, config, resumed))
        except Exception as e:  # noqa: BLE001 - each library fails its own way
            for tracker in opened:
                tracker.close(failed=True)
            raise PhikitError(f"report_to {n}: could not start a run ({first_line(e)})") from None
    return opened
