"""report_to: a run's metrics reach TensorBoard, W&B (offline), MLflow (a local store) and Trackio (a local
folder), each read back with its own library; an unknown or missing tracker is an error before the run."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from phikit.errors import PhikitError
from phikit.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
TRACKERS = ["tensorboard", "wandb", "mlflow", "trackio"]


@pytest.mark.slow
def test_metrics_reach_every_tracker_offline(tiny, tmp_path):
    for module in TRACKERS:
        pytest.importorskip(module)
    out = tmp_path / "run"
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "TRACKIO_DIR": str(tmp_path / "trackio"),
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "phikit", "finetune", "--config", str(REPO / "recipes" / "tiny-cpu.yaml"), "-q"]
    cmd += [
        "--model",
        str(tiny[0]),
        "--output_dir",
        str(out),
        "--data",
        str(REPO / "recipes/data/tiny-instructions.jsonl"),
    ]
    cmd += ["--max_steps", "3", "--eval_fraction", "0", "--report_to", ",".join(TRACKERS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [round(e.value, 5) for e in events.Scalars("loss")] == [round(v, 5) for v in losses]

    [record] = list((out / "wandb").glob("offline-run-*/run-*.wandb"))  # W&B's record log, synced later
    data = record.read_bytes()
    assert b"tokens_per_s" in data and json.dumps(losses[-1]).encode() in data  # history values as JSON text

    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3] and history[-1].value == pytest.approx(losses[-1])
    assert run.data.params["lora_r"] == "8"

    [db] = list((tmp_path / "trackio").rglob("*.db"))
    with sqlite3.connect(db) as con:
        tables = [t for (t,) in con.execute("select name from sqlite_master where type='table'")]
        rows = sum(con.execute(f'select count(*) from "{t}"').fetchone()[0] for t in tables if "metric" in t)
    assert rows >= 3, tables


def test_trackers_are_checked_before_the_run(tmp_path):
    with pytest.raises(PhikitError, match="report_to must be trackers among .*, got .tensorboard,comet."):
        TrainConfig.from_yaml(None, {"report_to": "tensorboard,comet"})
    assert TrainConfig.from_yaml(None, {"report_to": "none"}).report_to is None
    assert TrainConfig.from_yaml(None, {"report_to": ["WandB", "mlflow"]}).report_to == ["wandb", "mlflow"]
    from phikit.train.report import check_trackers

    with pytest.raises(PhikitError, match="unknown tracker"):
        check_trackers(["comet"])


def test_wandb_without_credentials_is_an_error_before_the_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from phikit.train.report import check_trackers

    for key in ("WANDB_API_KEY", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no W&B settings
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setattr(sys, "stdin", open(os.devnull))  # no terminal to ask on
    with pytest.raises(PhikitError, match="wandb has no API key: run `wandb login`"):
        check_trackers(["wandb"])
    monkeypatch.setenv("WANDB_MODE", "offline")  # logging locally needs no key
    check_trackers(["wandb"])


def test_an_interrupted_run_is_marked_so_and_its_resume_continues_the_same_runs(tiny, tmp_path, monkeypatch):
    for module in ("tensorboard", "mlflow"):
        pytest.importorskip(module)
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from phikit.train import finetune
    from phikit.train.recipe import SFTRecipe

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    settings = {
        "model": str(tiny[0]),
        "output_dir": str(out),
        "data": str(REPO / "recipes/data/tiny-instructions.jsonl"),
        "max_steps": 4,
        "save_every": 2,
        "eval_every": 1000,
        "report_to": "tensorboard,mlflow",
    }
    original, saves = SFTRecipe.save_checkpoint, []

    def second_save_interrupted(self):
        saves.append(self.step)
        if len(saves) == 2:
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(SFTRecipe, "save_checkpoint", second_save_interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune(TrainConfig.from_yaml(REPO / "recipes" / "tiny-cpu.yaml", settings), progress=False)
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED"
    monkeypatch.setattr(SFTRecipe, "save_checkpoint", original)
    finetune(TrainConfig.from_yaml(REPO / "recipes" / "tiny-cpu.yaml", {**settings, "resume": True}), progress=False)
    [again] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]  # what the first run logged past step 2: dropped
