"""What a run leaves on disk and reads back: checkpoints (adapter + optimizer, scheduler, loss-scaler and RNG
states + data position), written whole and renamed, and the metrics log."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import time
from pathlib import Path

import torch

from phikit.errors import PhikitError
from phikit.train.config import TrainConfig


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, step: int, write_weights, trainer_state: dict, limit: int) -> Path:
    """checkpoint-<step>/, written as a whole and renamed: the weights (``write_weights(folder)``: a PEFT
    adapter, or a whole HF checkpoint with full fine-tuning) and ``trainer_state.pt`` (optimizer, schedule,
    RNG, data position, settings: everything needed to resume). ``trainer_state.pt`` holds only tensors and
    plain values, so resuming reads it with ``torch.load(weights_only=True)``: a file planted in a checkpoint
    folder cannot run code. Keeps the newest ``limit`` checkpoints (0: all)."""
    from phikit.checkpoint import sweep_stale, write_folder

    final = out / f"checkpoint-{step}"
    sweep_stale(out, r"checkpoint-\d+")  # a killed run's unfinished checkpoint, whatever its step

    def write(tmp: Path) -> None:
        write_weights(tmp)
        torch.save({"step": step, "rng": _rng_state(), **trainer_state}, tmp / "trainer_state.pt")

    write_folder(final, write)
    for old in checkpoints(out)[:-limit] if limit > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


RESUME_SETTINGS = (
    "method",
    "model",
    "quantize",
    "lora",
    "fsdp",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
)


PATH_SETTINGS = ("model", "data", "eval_data")  # compared as the files they name


def whole_path(value):
    """A setting naming a local path that exists, as an absolute path (read the same from any folder); any
    other value (a Hub id, None, a number) as it is."""
    if isinstance(value, str) and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


# settings a resumed run may change without a word: how long it runs, how often it logs and saves, where
RESUME_FREE = (
    "resume",
    "output_dir",
    "max_steps",
    "epochs",
    "eval_every",
    "save_every",
    "save_total_limit",
    "log_every",
    "report_to",
    "device",
)


def _check_resume(checkpoint: Path, config: TrainConfig) -> list[str]:
    """``--resume`` continues the run a checkpoint was saved by: settings that shape the adapter or what it
    trains on top of must be the checkpoint's, else a PhikitError naming each that differs. Returns the other
    settings that differ (lr, seq_len, data ...: allowed, but worth a note), each as "key X there, Y now"."""
    saved = read_trainer_state(checkpoint / "trainer_state.pt").get("config", {})

    def differs(key: str) -> bool:  # a local path given relative once and whole once (recipe.yaml) is the same
        a, b = saved[key], getattr(config, key)
        return whole_path(a) != whole_path(b) if key in PATH_SETTINGS else a != b

    differ = [
        f"{key} {saved[key]!r} there, {getattr(config, key)!r} now"
        for key in RESUME_SETTINGS
        if key in saved and differs(key)
    ]
    if differ:
        raise PhikitError(
            f"--resume: {checkpoint} was trained with other settings ({'; '.join(differ)}); resume with its "
            "settings or start a new output_dir"
        )
    return [
        f"{key} {saved[key]!r} there, {getattr(config, key)!r} now"
        for key in saved
        if key not in (*RESUME_SETTINGS, *RESUME_FREE) and hasattr(config, key) and differs(key)
    ]


def read_trainer_state(path: Path) -> dict:
    """A checkpoint's trainer state, unpickled with ``weights_only=True`` (tensors and plain values only)."""
    from phikit.checkpoint import load_pickled

    return load_pickled(path, "remove that checkpoint folder to resume from an earlier one")


def how_to_go_on(out: Path) -> str:
    """What a run that stopped early left in ``out`` and how to go on from it: the terminal's note and the
    dashboard's last words."""
    kept = checkpoints(out) if out.is_dir() else []
    if not kept:
        return f"no checkpoint in {out} yet (one is saved every save_every steps); the run starts over"
    return f"the newest checkpoint is {kept[-1]}: run the same command with --resume to continue from it"


def checkpoints(out: Path) -> list[Path]:
    """The run's checkpoint-<step> folders in step order (``checkpoint-4.bak`` and the like are not)."""
    found = [
        p
        for p in out.glob("checkpoint-*")
        if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir() and (p / "trainer_state.pt").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def keep_lines_up_to(path: Path, step: int) -> None:
    """Rewrite a run's JSON-lines log (metrics.jsonl, completions.jsonl) keeping the lines of steps up to
    ``step`` (a resumed run's checkpoint: the killed run may have logged past it); a line that does not parse
    goes too. A missing file is written empty."""
    from phikit.checkpoint import atomic_write

    kept = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    atomic_write(path, lambda tmp: tmp.write_text("".join(kept), encoding="utf-8"))


class MetricsLog:
    """metrics.jsonl, the live dashboard.html beside it (``phikit.plots``, rewritten at most every few
    seconds and once at the end), and the trackers of ``report_to`` (``phikit.train.report``)."""

    def __init__(
        self,
        out: Path,
        enabled: bool,
        resume_step: int | None = None,
        report_to: list[str] | None = None,
        config: dict | None = None,
    ):
        """A fresh run starts a new file; a resumed one keeps the lines up to its checkpoint's step, so
        every step appears once (the killed run may have logged steps past its last checkpoint)."""
        self.enabled = enabled
        self.out = out
        self.path = out / "metrics.jsonl"
        self.trackers: list = []
        self.drawn = 0.0  # time.monotonic() of the last dashboard
        if enabled:
            from phikit.train.report import open_trackers

            keep_lines_up_to(self.path, resume_step if resume_step is not None else -1)
            self.trackers = open_trackers(report_to or [], out, out.resolve().name, config or {}, resume_step)

    def write(self, step: int, **values) -> None:
        if not self.enabled:
            return
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}
        with self.path.open("a") as f:  # standard JSON: a NaN or infinite value (a reward) is written null
            f.write(json.dumps({"step": step, **finite}) + "\n")
        for tracker in self.trackers:
            tracker.log(step, values)
        self.draw(live=True)

    def draw(self, live: bool, status: str = "run finished") -> None:
        """Rewrite dashboard.html (while live, at most every ``plots.REFRESH_S`` seconds)."""
        from phikit import plots

        if self.enabled and (not live or time.monotonic() - self.drawn >= plots.REFRESH_S):
            plots.write_dashboard(self.out, live=live, status=status)
            self.drawn = time.monotonic()

    def close(self, status: str = "run finished", failed: bool = False) -> None:
        """The dashboard drawn a last time with every row, saying ``status`` (how the run ended), instead of
        reloading; the trackers closed, told whether the run ``failed`` (interrupted or stopped by an error)."""
        self.draw(live=False, status=status)
        for tracker in self.trackers:
            tracker.close(failed)
