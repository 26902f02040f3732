"""Metrics of a training run: fetched from the device in batches (one host round trip
per logging period), written to `metrics.jsonl`, shown on the progress bar."""

import json
import time
from typing import Any

import jax
import numpy as np
from jaxtyping import Array


class MetricsLogger:
    """Collects the per-step metrics of the compiled training step and writes one record
    per logging period.

    **Arguments:**

    - `path`: the JSONL file to append to, or `None`.
    - `bar`: a tqdm bar whose postfix shows the loss (or `None`).
    - `start_step`: the step the run starts (or resumes) at.
    """

    def __init__(self, path: str | None, bar, start_step: int):
        self.path = path
        self.bar = bar
        self.records: list[dict[str, Any]] = []
        self.evaluations: list[dict[str, Any]] = []
        self._losses: list[np.ndarray] = []
        self._pending: list[dict[str, Array]] = []
        self._last_time, self._last_step = time.perf_counter(), start_step
        #: Consecutive and total skipped (non-finite) updates, as of the last flush.
        self.nonfinite_count = 0
        self.nonfinite_total = 0

    def add(self, metrics: dict[str, Array]) -> None:
        """Queue the (device) metrics of one compiled call."""
        self._pending.append(metrics)

    @property
    def losses(self) -> np.ndarray:
        return np.concatenate(self._losses) if self._losses else np.zeros((0,))

    def _write(self, obj: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(obj) + "\n")

    def flush(self, step: int) -> dict[str, Any] | None:
        """Fetch the queued metrics, write their record at `step` and return it."""
        if not self._pending:
            return None
        fetched = jax.device_get(self._pending)
        self._pending = []
        now = time.perf_counter()
        arrays = {k: np.concatenate([np.reshape(m[k], -1) for m in fetched]) for k in fetched[0]}
        self._losses.append(arrays["loss"])
        self.nonfinite_count = int(arrays["nonfinite_count"][-1])
        self.nonfinite_total = int(arrays["nonfinite_total"][-1])
        finite = arrays["loss"][np.isfinite(arrays["loss"])]
        record = {
            "step": step,
            "loss": float(np.mean(finite)) if finite.size else float("nan"),
            "grad_norm": float(np.nanmean(arrays["grad_norm"])) if finite.size else float("nan"),
            "steps_per_sec": (step - self._last_step) / max(now - self._last_time, 1e-9),
            "nonfinite_total": self.nonfinite_total,
        }
        if "lr" in arrays:
            record["lr"] = float(arrays["lr"][-1])
        self._last_time, self._last_step = now, step
        self.records.append(record)
        self._write(record)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
        return record

    def log_evaluation(self, record: dict[str, Any]) -> None:
        self.evaluations.append(record)
        self._write({"eval": record})
        if self.bar is not None:
            self.bar.write(
                " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in record.items()
                )
            )
