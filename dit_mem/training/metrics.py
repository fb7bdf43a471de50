"""Training metrics from the main process: CSV (always), TensorBoard, W&B, a loss-curve PNG.

``metrics.csv`` has one row per logged optimizer step (``step, epoch, loss, lr, grad_norm,
time``). A resumed run first drops rows after the checkpoint's step (a killed run may have
logged steps past its last checkpoint, or half a line), so the file always describes one
consistent history.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

from dit_mem.errors import UserError
from dit_mem.utils import get_logger
from dit_mem.utils.io import write_text_atomic

log = get_logger(__name__)

FIELDS = ["step", "epoch", "loss", "lr", "grad_norm", "time"]


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """Rows of a metrics CSV as floats (malformed lines skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                rows.append({k: float(row[k]) for k in FIELDS})
            except (TypeError, ValueError, KeyError):
                continue
    return rows


class MetricsLogger:
    """Writes metrics on the main process; every method is a no-op elsewhere."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        loggers: tuple[str, ...] = (),
        resume_step: int = 0,
        config: dict[str, Any] | None = None,
        wandb_project: str = "dit-mem",
    ):
        self.enabled = enabled
        self.csv_path = run_dir / "metrics.csv"
        self.png_path = run_dir / "loss_curve.png"
        self._tb = None
        self._wandb = None
        self._t0 = time.time()
        if not enabled:
            return
        kept = [r for r in read_metrics(self.csv_path) if r["step"] <= resume_step]
        lines = [",".join(FIELDS)] + [",".join(_fmt(k, r[k]) for k in FIELDS) for r in kept]
        write_text_atomic(self.csv_path, "\n".join(lines) + "\n")
        self._file = self.csv_path.open("a", newline="", buffering=1)
        self._writer = csv.DictWriter(self._file, fieldnames=FIELDS)
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        if "wandb" in loggers:
            try:
                import wandb
            except ImportError:
                raise UserError("log_with includes wandb, but wandb is not installed") from None
            self._wandb = wandb.init(
                project=wandb_project,
                name=run_dir.name,
                dir=str(run_dir),
                config=config,
                resume="allow",
            )

    def log(self, step: int, epoch: int, loss: float, lr: float, grad_norm: float) -> None:
        if not self.enabled:
            return
        row = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "time": round(time.time() - self._t0, 3),
        }
        self._writer.writerow({k: _fmt(k, v) for k, v in row.items()})
        if self._tb is not None:
            for key in ("loss", "lr", "grad_norm"):
                self._tb.add_scalar(f"train/{key}", row[key], step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": row[k] for k in ("loss", "lr", "grad_norm")}, step=step)

    def close(self) -> None:
        """Flush and close everything; draw the loss curve from the whole CSV."""
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        plot_loss_curve(self.csv_path, self.png_path)


def plot_loss_curve(csv_path: Path, png_path: Path) -> None:
    """Loss per step (and a moving average) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dit_mem.utils import atomic_path

    rows = read_metrics(csv_path)
    if not rows:
        return
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label=f"moving average ({window})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("weighted flow-matching loss")
    ax.set_title("DiT-Mem memory encoder training")
    ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _fmt(key: str, v: float) -> str:
    return str(int(v)) if key in ("step", "epoch") else f"{float(v):.8g}"
