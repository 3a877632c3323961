"""Metric writing (metrics.jsonl, TensorBoard, Weights & Biases), throughput and MFU.

`<workdir>/metrics.jsonl` gets one JSON object per logged step
(`{"step": 100, "loss": 2.3, ...}`) and one per evaluation (`{"step": 500,
"eval/loss": ...}`); the demo report draws loss curves from it and the resume
test compares it line by line. A resumed run first drops the lines of steps
after its checkpoint (the run before it died past that step; those steps
are logged again), so each step appears once. TensorBoard gets the same
scalars, image summaries (sample grids, reconstructions) and histograms
(e.g. the VQGAN's per-code usage), through tensorboardX: no TensorFlow needed.
Weights & Biases (optional, `WriterConfig.wandb`; offline by default) gets the
same three. `WriterConfig` chooses the writers (gin: `LoopConfig.writers =
@WriterConfig()`); metrics.jsonl is always written. Everything goes through
parti_jax/storage.py, so the work dir may be a URL (gs://bucket/run).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from parti_jax import devices, storage


# Dense bf16 peak FLOP/s per device (no sparsity).
def device_peak_flops(device_kind: str, override: float | None = None) -> float | None:
    """Peak bf16 FLOP/s of one device by its `device_kind` (None when unknown)."""
    if override:
        return float(override)
    return devices.device_spec(device_kind)[0]


def mfu(flops_per_step: float, seconds_per_step: float, num_devices: int, peak: float) -> float:
    """Model FLOPs utilisation: useful FLOP/s over the devices' peak."""
    return flops_per_step / seconds_per_step / (num_devices * peak)


WANDB_MODES = ("offline", "online", "disabled")
WANDB_RUN_ID_FILE = "wandb_run_id.txt"


@dataclasses.dataclass(frozen=True)
class WriterConfig:
    """Where a training run's metrics go besides metrics.jsonl (always written: the demo
    report and the resume checks read it). Bound in gin as `LoopConfig.writers =
    @WriterConfig()`, e.g. `WriterConfig.wandb = True`."""

    # TensorBoard event files in <workdir>/tensorboard: scalars, images, histograms.
    tensorboard: bool = True
    # Weights & Biases (needs `pip install wandb`); the run's files go to <workdir>/wandb.
    wandb: bool = False
    # The W&B project and entity (team or user; None: W&B's default for the account).
    wandb_project: str = "parti_jax"
    wandb_entity: str | None = None
    # 'offline' (nothing leaves the machine; `wandb sync <workdir>/wandb/offline-run-*`
    # uploads later), 'online', or 'disabled'.
    wandb_mode: str = "offline"
    # The run's display name (None: the work dir's last path component).
    wandb_name: str | None = None

    def __post_init__(self) -> None:
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(
                f"WriterConfig.wandb_mode={self.wandb_mode!r}: expected one of {WANDB_MODES}"
            )
        if self.wandb and importlib.util.find_spec("wandb") is None:
            raise ValueError(
                "WriterConfig.wandb=True needs the wandb package, which is not installed: "
                "pip install wandb (or bind WriterConfig.wandb = False)"
            )


class MetricWriter:
    """Scalars to `<workdir>/metrics.jsonl`; scalars, images and histograms to TensorBoard
    and, when `writers.wandb`, to Weights & Biases (process 0 only).

    The work dir may be a URL (gs://bucket/run; parti_jax/storage.py). metrics.jsonl is a
    `storage.Appender`: appended line by line on a local disk; on an object store it is
    rewritten whole at `flush()` (the loop flushes at each checkpoint), at `close()`, and
    every `flush_secs` while scalars come in, as TensorFlow's own GCS writer does.
    TensorBoard event files (`<workdir>/tensorboard`) are written with tensorboardX,
    which needs no TensorFlow; for a URL it writes them into a local temporary folder
    and the event files that changed are uploaded at the same moments, so TensorBoard
    pointed at gs://bucket/run/tensorboard sees them. TensorBoard is written when both
    `tensorboard` (the older switch, `LoopConfig.tensorboard`) and `writers.tensorboard`
    say so. W&B writes its run folder under `<workdir>/wandb` (for a URL: a local
    temporary folder uploaded at the same moments); the run's id is kept in
    `<workdir>/wandb_run_id.txt`, so a resumed run continues the same W&B run.
    A run resumed at `start_step` drops what was logged for later steps (the lines of
    metrics.jsonl; TensorBoard hides those events).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        writers: WriterConfig | None = None,
        is_primary: bool = True,
        filename: str = "metrics.jsonl",
        start_step: int | None = None,
        flush_secs: float = 30.0,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        writers = writers or WriterConfig()
        self.is_primary = is_primary
        self.path = storage.join(workdir, filename)
        self.flush_secs = flush_secs
        self._file: storage.Appender | None = None
        self._tb = self._tb_sync = None
        self._wandb = self._wandb_sync = None
        self._flushed = time.monotonic()
        if not is_primary:
            return
        if start_step is not None:
            drop_lines_after(self.path, start_step)
        self._file = storage.Appender(self.path)
        if writers.wandb:
            self._wandb, self._wandb_sync = _start_wandb(workdir, writers, run_config)
        if tensorboard and writers.tensorboard:
            from tensorboardX import SummaryWriter

            logdir = storage.join(workdir, "tensorboard")
            if storage.is_url(logdir):
                self._tb_sync = _FolderSync(logdir)
                logdir = self._tb_sync.local
            self._tb = SummaryWriter(
                logdir,
                flush_secs=flush_secs,
                purge_step=start_step + 1 if start_step else None,
            )

    @property
    def writes_summaries(self) -> bool:
        """Whether images and histograms go anywhere (TensorBoard or W&B on, process 0)."""
        return self._tb is not None or self._wandb is not None

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if self._file is None:
            return
        clean = {k: _to_float(v) for k, v in scalars.items()}
        self._file.write(json.dumps({"step": int(step), **clean}, allow_nan=True) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, int(step))
        if self._wandb is not None:
            self._wandb.log(clean, step=int(step))
        if time.monotonic() - self._flushed > self.flush_secs:
            self.flush()

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """uint8 [H, W, 3] images (e.g. sample grids, reconstructions) as image summaries."""
        if not images:
            return
        if self._tb is not None:
            for k, image in images.items():
                self._tb.add_image(k, np.asarray(image), int(step), dataformats="HWC")
        if self._wandb is not None:
            import wandb

            logged = {k: wandb.Image(np.asarray(image)) for k, image in images.items()}
            self._wandb.log(logged, step=int(step))

    def write_histogram(self, step: int, name: str, values: np.ndarray, bins: int = 64) -> None:
        """The distribution of `values` (any shape, flattened) as a histogram summary, e.g.
        the VQGAN's per-code usage counts: a spike at 0 is the dead codes."""
        if not self.writes_summaries:
            return
        values = np.asarray(values, np.float64).reshape(-1)
        if values.size == 0:
            return
        counts, edges = np.histogram(values, bins=bins)
        if self._tb is not None:
            self._tb.add_histogram_raw(
                name,
                min=float(values.min()),
                max=float(values.max()),
                num=int(values.size),
                sum=float(values.sum()),
                sum_squares=float(np.square(values).sum()),
                bucket_limits=edges[1:].tolist(),
                bucket_counts=counts.tolist(),
                global_step=int(step),
            )
        if self._wandb is not None:
            import wandb

            histogram = wandb.Histogram(np_histogram=(counts, edges))
            self._wandb.log({name: histogram}, step=int(step))

    def flush(self) -> None:
        """Makes everything written so far visible in the work dir."""
        self._flushed = time.monotonic()
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()
        if self._tb_sync is not None:
            self._tb_sync.upload()
        if self._wandb_sync is not None:
            self._wandb_sync.upload()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._tb_sync is not None:
            self._tb_sync.upload()
            self._tb_sync.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._wandb_sync is not None:
            self._wandb_sync.upload()
            self._wandb_sync.close()
        self._file = self._tb = self._tb_sync = self._wandb = self._wandb_sync = None


def _start_wandb(
    workdir: str | os.PathLike, writers: WriterConfig, run_config: Mapping[str, Any] | None
) -> tuple[Any, _FolderSync | None]:
    """A W&B run writing under <workdir>/wandb (staged locally for a URL), resumed by the id
    kept in <workdir>/wandb_run_id.txt."""
    try:
        import wandb
    except ImportError as e:
        raise ValueError(
            "WriterConfig.wandb=True needs the wandb package, which does not import "
            f"({e}): pip install wandb (or bind WriterConfig.wandb = False)"
        ) from e
    # W&B writes into <dir>/wandb: dir is the work dir (for a URL, a local folder mirrored
    # to it, so the run lands in <workdir>/wandb there too).
    sync = None
    if storage.is_url(workdir):
        sync = _FolderSync(storage.join(workdir))
        local = sync.local
    else:
        local = os.fspath(storage.path(workdir))
    id_file = storage.join(workdir, WANDB_RUN_ID_FILE)
    if storage.exists(id_file):
        run_id = storage.read_text(id_file).strip()
    else:
        run_id = secrets.token_hex(4)  # W&B run ids: lowercase letters and digits
        storage.write_text(id_file, run_id + "\n")
    name = writers.wandb_name or storage.join(workdir).rstrip("/").rsplit("/", 1)[-1]
    run = wandb.init(
        project=writers.wandb_project,
        entity=writers.wandb_entity,
        name=name,
        id=run_id,
        resume="allow",
        mode=writers.wandb_mode,
        dir=local,
        config=dict(run_config or {}),
    )
    return run, sync


class _FolderSync:
    """A local temporary folder mirrored to a URL: `upload()` copies the files that
    changed since the last upload (a TensorBoard event file grows: it is copied whole)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.local = tempfile.mkdtemp(prefix="parti_jax_tensorboard_")
        self._seen: dict[str, tuple[int, int]] = {}

    def upload(self) -> None:
        for folder, _, files in os.walk(self.local):
            for name in files:
                file = os.path.join(folder, name)
                stat = os.stat(file)
                if self._seen.get(file) != (stat.st_size, stat.st_mtime_ns):
                    rel = os.path.relpath(file, self.local)
                    storage.copy(file, storage.join(self.url, *rel.split(os.sep)))
                    self._seen[file] = (stat.st_size, stat.st_mtime_ns)

    def close(self) -> None:
        shutil.rmtree(self.local, ignore_errors=True)


def _to_float(v: Any) -> float | int:
    if isinstance(v, int | bool):
        return int(v)
    return float(v)


def drop_lines_after(path: str | os.PathLike, step: int) -> None:
    """Rewrites a JSON-lines log (a local file or a URL) without the lines of steps after
    `step` (and a last line cut short by a kill); lines without a step or that do not
    parse are kept. The rewrite is atomic."""
    if not storage.exists(path):
        return
    lines = storage.read_text(path).splitlines(keepends=True)

    def keep(line: str) -> bool:
        if not line.endswith("\n"):
            return False
        try:
            return not json.loads(line).get("step", 0) > step
        except (ValueError, AttributeError, TypeError):
            return True

    kept = [line for line in lines if keep(line)]
    if len(kept) < len(lines):
        storage.write_text(path, "".join(kept))


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The logged lines of a metrics.jsonl, a local file or a URL (for reports and tests)."""
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


class Throughput:
    """Examples/s, tokens/s and MFU between two logging points."""

    def __init__(
        self,
        *,
        examples_per_step: int,
        tokens_per_step: int = 0,
        flops_per_step: float | None = None,
        num_devices: int = 1,
        peak_flops: float | None = None,
    ) -> None:
        self.examples_per_step = examples_per_step
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.num_devices = num_devices
        self.peak_flops = peak_flops
        self._t = time.perf_counter()
        self._step: int | None = None

    def reset(self, step: int) -> None:
        self._t = time.perf_counter()
        self._step = step

    def measure(self, step: int) -> dict[str, float]:
        """Rates since the last call (empty on the first call)."""
        now = time.perf_counter()
        out: dict[str, float] = {}
        if self._step is not None and step > self._step:
            dt = (now - self._t) / (step - self._step)
            out["seconds_per_step"] = dt
            out["examples_per_second"] = self.examples_per_step / dt
            if self.tokens_per_step:
                out["tokens_per_second"] = self.tokens_per_step / dt
            if self.flops_per_step and self.peak_flops:
                out["mfu"] = mfu(self.flops_per_step, dt, self.num_devices, self.peak_flops)
        self._t, self._step = now, step
        return out


def progress_line(
    step: int, num_steps: int, scalars: Mapping[str, Any], eta_s: float | None
) -> str:
    """One console line: step, loss and friends, throughput, ETA."""
    parts = [f"step {step}/{num_steps}"]
    for key, fmt in (
        ("loss", "{:.4f}"),
        ("accuracy", "{:.3f}"),
        ("learning_rate", "{:.2e}"),
        ("grad_norm", "{:.3f}"),
        ("examples_per_second", "{:.1f} ex/s"),
        ("tokens_per_second", "{:.0f} tok/s"),
        ("mfu", "MFU {:.1%}"),
    ):
        if key in scalars:
            text = fmt.format(float(scalars[key]))
            parts.append(text if " " in fmt else f"{key} {text}")
    if eta_s is not None and math.isfinite(eta_s):
        parts.append(f"eta {_duration(eta_s)}")
    return " | ".join(parts)


def _duration(s: float) -> str:
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def console(message: str) -> None:
    """Prints on process 0 only (flushes, so logs of killed runs are complete)."""
    if os.environ.get("PARTI_JAX_QUIET"):
        return
    jax = sys.modules.get("jax")
    if jax is not None and jax.process_index() != 0:
        return
    print(message, flush=True)


def image_grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Stacks image batches as rows of a grid: uint8 [R*(H+pad)+pad, N*(W+pad)+pad, 3]."""
    n, h, w, _ = rows[0].shape
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for r, batch in enumerate(rows):
        pixels = np.round(np.clip(np.asarray(batch, np.float32), 0.0, 1.0) * 255.0)
        for i in range(n):
            y, x = pad + r * (h + pad), pad + i * (w + pad)
            grid[y : y + h, x : x + w] = pixels[i].astype(np.uint8)
    return grid
