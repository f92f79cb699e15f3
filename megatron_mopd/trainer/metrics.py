"""Per-step metrics: the console (progress bar + one line per interval), ``metrics.jsonl``, TensorBoard
and Weights & Biases when installed, and at the end ``report.json`` and ``curves.png``.

One JSON object per step in ``metrics.jsonl``: ``step``, ``loss`` (per completion token), ``lr``,
``tokens`` (completion tokens of the global batch), ``tokens_per_s``, ``grad_norm``, ``on_policy``
(whether the student sampled the step's completions), ``completions`` (``dataset``, ``student`` or
``teacher``),
``divergence/<teacher>`` (that teacher's mean divergence per token it scored), ``sft/nll`` when
``sft_alpha`` > 0, ``time/<phase>`` seconds, and the data counters (``data/truncated_samples``, ...).
With ``eval.path``, ``eval.jsonl`` holds one object per held-out evaluation (before step ``step``):
``eval/divergence/<teacher>`` on the student's samples of the held-out prompts, ``eval/seconds``, and
``examples``: a few prompts with the completion the student sampled.
A resumed run first drops the lines of steps at or after the one it resumes from, so the files always
describe one history. Only the reporting rank (last pipeline stage, TP rank 0, DP rank 0) writes.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_mopd.trainer.files import atomic_write_text
from megatron_mopd.trainer.step import Evaluation, StepResult

METRICS_FILE, EVAL_FILE, REPORT_FILE, CURVES_FILE = "metrics.jsonl", "eval.jsonl", "report.json", "curves.png"


def step_record(result: StepResult) -> dict[str, Any]:
    """The JSON object of one step (see the module docstring)."""
    sums = result.sums or {}
    tokens = sums.get("loss", (0.0, 0.0))[1]
    busy = sum(result.seconds.values())
    record: dict[str, Any] = {
        "step": result.step,
        "loss": _mean(sums.get("loss")),
        "lr": result.lr,
        "tokens": int(tokens),
        "tokens_per_s": tokens / busy if busy > 0 else None,
        "grad_norm": result.grad_norm,
        "on_policy": result.on_policy,
        "completions": result.completions,
    }
    for name, pair in sorted(sums.items()):
        if name != "loss":
            record[name] = _mean(pair)
    record.update({f"time/{phase}": seconds for phase, seconds in result.seconds.items()})
    record.update(result.data.as_dict())
    return record


def _mean(pair: Optional[tuple[float, float]]) -> Optional[float]:
    if pair is None or pair[1] == 0:
        return None
    return pair[0] / pair[1]


class MetricsLogger:
    """Writes the run's metrics (module docstring); a no-op object on the other ranks."""

    def __init__(self, output_dir: Path, *, total_steps: int, start_step: int, interval: int, progress: bool,
                 tensorboard: bool, wandb_project: Optional[str], config: dict[str, Any]) -> None:
        self.output_dir, self.interval = output_dir, interval
        self.path = output_dir / METRICS_FILE
        self.records = _kept_records(self.path, start_step)
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        self._file = open(self.path, "a", encoding="utf-8")
        self.evals = _kept_records(output_dir / EVAL_FILE, start_step, through=True)
        atomic_write_text(output_dir / EVAL_FILE, "".join(json.dumps(r) + "\n" for r in self.evals))
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._tensorboard = self._wandb = None
        if tensorboard:
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(output_dir / "tensorboard"))
        if wandb_project:
            with contextlib.suppress(ImportError):
                import wandb

                self._wandb = wandb.init(project=wandb_project, config=config, dir=str(output_dir), resume="allow")

    def log(self, result: StepResult) -> dict[str, Any]:
        record = step_record(result)
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(name, value, record["step"])
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}" if record["loss"] is not None else "-")
        if (record["step"] + 1) % self.interval == 0:
            self.write(format_record(record))
        return record

    def log_eval(self, evaluation: Evaluation, examples_per_domain: int) -> dict[str, Any]:
        """Record a held-out evaluation (``eval.jsonl``, dashboards, one console line)."""
        record: dict[str, Any] = {"step": evaluation.step, "eval/seconds": evaluation.seconds}
        for name, pair in sorted((evaluation.sums or {}).items()):
            if name.startswith("divergence/"):
                record[f"eval/{name}"] = _mean(pair)
        shown: dict[Any, int] = {}
        record["examples"] = []
        for example in evaluation.examples:
            domain = example.sample.domain
            if shown.get(domain, 0) < examples_per_domain:
                shown[domain] = shown.get(domain, 0) + 1
                prompt = example.sample.prompt
                record["examples"].append({"domain": domain, "prompt": prompt if isinstance(prompt, str) else
                                           [dict(m) for m in prompt], "completion": example.sample.completion})
        self.evals.append(record)
        with open(self.output_dir / EVAL_FILE, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for name, value in record.items():
                if name.startswith("eval/divergence/") and value is not None:
                    self._tensorboard.add_scalar(name, value, evaluation.step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k.startswith("eval/")}, step=evaluation.step)
        divergences = " | ".join(f"{name.split('/', 2)[2]} {_fmt(value)}" for name, value in record.items()
                                 if name.startswith("eval/divergence/"))
        self.write(f"eval at step {evaluation.step}: held-out divergence {divergences} "
                   f"({evaluation.seconds:.1f} s)")
        return record

    def write(self, line: str) -> None:
        """Print a line without breaking the progress bar."""
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def format_record(record: dict[str, Any]) -> str:
    """One console line: step, loss, each teacher's divergence, lr, tokens/s, phase times."""
    parts = [f"step {record['step']:>5}", f"loss {_fmt(record['loss'])}"]
    parts += [f"{name.split('/', 1)[1]} {_fmt(value)}" for name, value in record.items()
              if name.startswith("divergence/")]
    if record.get("sft/nll") is not None:
        parts.append(f"sft {_fmt(record['sft/nll'])}")
    parts.append(f"lr {record['lr']:.2e}")
    if record.get("tokens_per_s"):
        parts.append(f"{record['tokens_per_s']:.0f} tok/s")
    times = " ".join(f"{name.split('/', 1)[1]} {value * 1e3:.0f}" for name, value in record.items()
                     if name.startswith("time/"))
    return " | ".join(parts) + f" | ms: {times}"


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def _kept_records(path: Path, start_step: int, through: bool = False) -> list[dict[str, Any]]:
    """The records of an earlier run before ``start_step`` (``through``: at or before it, for
    evaluations, which come before a step)."""
    if start_step == 0 or not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            step = record.get("step", math.inf)
            if step < start_step or through and step == start_step:
                records.append(record)
    return records


def write_report(output_dir: Path, records: list[dict[str, Any]], extra: dict[str, Any],
                 evals: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """``report.json``: first and last values of the loss and every divergence, steps, plus ``extra``.

    ``teachers.<name>.divergence_start/_end`` are the held-out evaluations' first and last values when
    there are evaluations (the student's samples of held-out prompts), else the training curve's; the
    training curve's are always there too (``train_divergence_start/_end``)."""
    report: dict[str, Any] = {"steps": len(records), **extra}
    names = ["loss"] + sorted({k for r in records for k in r if k.startswith(("divergence/", "sft/"))})
    curves = {}
    for name in names:
        values = [r[name] for r in records if r.get(name) is not None]
        if values:
            curves[name] = {"start": values[0], "end": values[-1], "min": min(values)}
    report["curves"] = curves
    teachers = {}
    for name, curve in curves.items():
        if name.startswith("divergence/"):
            teacher = name.split("/", 1)[1]
            held_out = [e[f"eval/{name}"] for e in evals if e.get(f"eval/{name}") is not None]
            start, end = (held_out[0], held_out[-1]) if held_out else (curve["start"], curve["end"])
            teachers[teacher] = {"divergence_start": start, "divergence_end": end,
                                 "train_divergence_start": curve["start"], "train_divergence_end": curve["end"]}
    report["teachers"] = teachers
    if evals:
        report["eval"] = {"measured_before_steps": [e["step"] for e in evals],
                          "examples_before": evals[0]["examples"], "examples_after": evals[-1]["examples"]}
    atomic_write_text(output_dir / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    return report


def plot_curves(output_dir: Path, records: list[dict[str, Any]], evals: Sequence[dict[str, Any]] = ()
                ) -> Optional[Path]:
    """``curves.png``: the loss and each teacher's divergence per step, with the held-out evaluations as
    markers (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = ["loss"] + sorted({k for r in records for k in r if k.startswith(("divergence/", "sft/"))})
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        points = [(r["step"], r[name]) for r in records if r.get(name) is not None]
        if points:
            line, = axes[0].plot(*zip(*points), label=name)
            held_out = [(e["step"], e[f"eval/{name}"]) for e in evals if e.get(f"eval/{name}") is not None]
            if held_out:
                axes[0].plot(*zip(*held_out), "o--", color=line.get_color(), label=f"{name} (held-out)")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("per completion token")
    axes[0].set_title("loss and divergence to each teacher")
    axes[0].legend()
    axes[1].plot([r["step"] for r in records], [r["lr"] for r in records])
    axes[1].set_xlabel("step")
    axes[1].set_title("learning rate")
    figure.tight_layout()
    path = output_dir / CURVES_FILE
    staging = path.with_name(".curves.tmp.png")
    figure.savefig(staging, dpi=100)
    plt.close(figure)
    staging.replace(path)
    return path
