"""The trainer's configuration: one typed schema, loaded from YAML with dotted command-line overrides.

    config = load_config("run.yaml", ["train.lr=1e-5", "teachers.0.topk=64"])

The schema is a tree of dataclasses (OmegaConf structured configs, as NeMo uses): every field has a
default and a help text (``field(metadata={"help": ...})``, from which ``mopd train --help-config``
prints the reference), and each section's ``__post_init__`` rejects impossible values with a
sentence naming the field. OmegaConf refuses unknown keys and values of the wrong type. Checks that
need the run's world size or the model's sizes live in ``trainer/setup.py``.

Scripts (Slurm requeue, sweeps) rely on these keys keeping their names: ``output_dir``,
``train.steps``, ``checkpoint.interval`` (steps) and ``checkpoint.resume`` (``auto`` continues from
the latest checkpoint in ``output_dir``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "EvalConfig", "LoggingConfig", "LossConfig", "MopdConfig",
    "ModelConfig", "ParallelConfig", "RolloutConfig", "TeacherConfig", "TrainConfig", "config_reference",
    "default_teacher_temperatures", "load_config", "save_config",
]

TEACHER_LOSSES = ("topk_jsd", "jsd", "ctkd", "gold", "mopd")
FUSED_OUTPUT_LAYER_LOSSES = ("topk_jsd", "mopd")  # the others read the student's logits whole
PLACEMENTS = ("remote", "colocated")
PROTOCOLS = ("vllm", "sglang")
TAILS = ("tail", "renorm")
ROUTINGS = ("weights", "domain")
LR_DECAY_STYLES = ("constant", "linear", "cosine")
PRECISIONS = ("fp32", "bf16")
ROLLOUT_ENGINES = ("megatron", "server")
ROLLOUT_SERVERS = ("reference", "vllm")


REQUIRED = "???"  # OmegaConf's mandatory value: loading fails naming the key unless it is set


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and the fix."""


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    """The student."""

    path: str = _help("Hugging Face model directory of the student (config.json, safetensors, tokenizer); required",
                      REQUIRED)
    tokenizer: Optional[str] = _help("tokenizer directory (default: model.path)", None)
    load_weights: bool = _help("load the directory's weights; false: Megatron's random initialization", True)
    make_vocab_size_divisible_by: int = _help("pad the vocabulary to a multiple of this times TP (Megatron-LM)", 128)

    def __post_init__(self) -> None:
        _require(self.make_vocab_size_divisible_by >= 1, "model.make_vocab_size_divisible_by must be >= 1")


@dataclass
class ParallelConfig:
    """Megatron's parallel layout; data-parallel size = world size / (tp · pp · cp)."""

    tp: int = _help("tensor-parallel size", 1)
    pp: int = _help("pipeline-parallel size", 1)
    cp: int = _help("context-parallel size", 1)
    sequence_parallel: bool = _help("Megatron sequence parallelism (needs tp > 1)", False)
    virtual_pipeline: Optional[int] = _help("virtual pipeline stages per rank (interleaved schedule)", None)
    device: Optional[str] = _help("cuda, npu or cpu (default: the best available)", None)

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp"):
            _require(getattr(self, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        _require(not self.sequence_parallel or self.tp > 1, "parallel.sequence_parallel needs parallel.tp > 1")
        _require(self.virtual_pipeline is None, "parallel.virtual_pipeline is not supported yet: remove it")
        _require(self.device in (None, "cuda", "npu", "cpu"),
                 f"parallel.device must be cuda, npu or cpu, got {self.device!r}")


@dataclass
class DataConfig:
    """The prompt dataset (JSONL: ``messages``, or ``prompt``/``completion``; optional ``domain``)."""

    path: str = _help("JSONL file (or a directory saved by Hugging Face datasets); required", REQUIRED)
    seq_length: int = _help("tokens per sequence (prompt + completion); longer samples are truncated", 512)
    shuffle: bool = _help("shuffle every epoch (deterministic from the seed)", True)
    prompt_key: str = _help("field of a plain prompt", "prompt")
    completion_key: str = _help("field of the reference completion", "completion")
    messages_key: str = _help("field of a chat (the final assistant message is the completion)", "messages")
    domain_key: str = _help("field routing a sample to its teacher (loss.routing=domain)", "domain")

    def __post_init__(self) -> None:
        _require(self.seq_length >= 2, f"data.seq_length must be >= 2, got {self.seq_length}")


@dataclass
class TrainConfig:
    """Optimization."""

    steps: int = _help("optimizer steps", 100)
    micro_batch_size: int = _help("sequences per micro-batch and data-parallel rank", 1)
    global_batch_size: int = _help("sequences per optimizer step over all data-parallel ranks", 8)
    lr: float = _help("peak learning rate", 1e-5)
    min_lr: float = _help("learning rate at the end of the decay", 0.0)
    lr_warmup_steps: int = _help("linear warmup steps", 0)
    lr_decay_style: str = _help("constant, linear or cosine (decay over train.steps)", "cosine")
    weight_decay: float = _help("AdamW weight decay", 0.0)
    adam_beta1: float = _help("Adam β1", 0.9)
    adam_beta2: float = _help("Adam β2", 0.95)
    adam_eps: float = _help("Adam ε", 1e-8)
    clip_grad: float = _help("gradient-norm clipping (0: off; CUDA/NPU only, off on CPU)", 1.0)
    precision: str = _help("fp32 or bf16 (bf16: CUDA/NPU)", "fp32")

    def __post_init__(self) -> None:
        _require(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        _require(self.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        _require(self.global_batch_size >= 1, f"train.global_batch_size must be >= 1, got {self.global_batch_size}")
        _require(self.lr > 0 and math.isfinite(self.lr), f"train.lr must be a finite number > 0, got {self.lr}")
        _require(0 <= self.min_lr <= self.lr, f"train.min_lr must be in [0, train.lr], got {self.min_lr}")
        _require(0 <= self.lr_warmup_steps <= self.steps, "train.lr_warmup_steps must be in [0, train.steps]")
        _require(self.lr_decay_style in LR_DECAY_STYLES, f"train.lr_decay_style must be one of {LR_DECAY_STYLES}")
        _require(self.clip_grad >= 0, f"train.clip_grad must be >= 0, got {self.clip_grad}")
        _require(self.precision in PRECISIONS, f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        _require(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "train.adam_beta1/2 must be in [0, 1)")


@dataclass
class LossConfig:
    """How the teachers' losses combine; every teacher's loss is a mean over the student's completion tokens."""

    routing: str = _help("weights: every teacher scores every sample, weighted; domain: each sample only by "
                         "the teacher listing its domain", "weights")
    sft_alpha: float = _help("weight of the cross-entropy on dataset completions (never on student samples)", 0.0)
    validate_inputs: bool = _help("check every loss input on the device each micro-batch (host syncs; to locate a "
                                  "bad position); off, the loss is checked once per step and a non-finite one "
                                  "names its teachers", False)
    fused_output_layer: bool = _help("compute the output layer inside the loss, chunk by chunk, so the student's "
                                     "logits never exist (the same losses and gradients, far less memory); "
                                     "teacher losses topk_jsd and mopd, and sft_alpha", False)

    def __post_init__(self) -> None:
        _require(self.routing in ROUTINGS, f"loss.routing must be one of {ROUTINGS}, got {self.routing!r}")
        _require(self.sft_alpha >= 0 and math.isfinite(self.sft_alpha), "loss.sft_alpha must be a finite number >= 0")


@dataclass
class TeacherConfig:
    """One teacher and its loss."""

    name: str = _help("name in logs and metrics (divergence/<name>)", "")
    loss: str = _help("topk_jsd (top-K JSD), jsd (full vocabulary, colocated), ctkd (P-KL through a projection), "
                      "gold, or mopd (sampled-token advantage)", "topk_jsd")
    placement: str = _help("remote (a vLLM/SGLang server) or colocated (a Megatron model in this job)", "remote")
    urls: List[str] = _help("server URLs (remote); empty with model set: the trainer serves model itself", list, list)
    model: Optional[str] = _help("Hugging Face model directory: served by the trainer (remote without urls) "
                                 "or loaded into Megatron (colocated)", None)
    protocol: str = _help("vllm or sglang (remote)", "vllm")
    topk: int = _help("teacher log-probabilities per position (a server must allow it: --max-logprobs)", 20)
    beta: float = _help("generalized JSD β: 0 forward KL, 1 reverse KL", 0.5)
    tail: str = _help("tail (K+1 buckets) or renorm (top-K loss)", "tail")
    temperature: Optional[float] = _help("τ applied to both sides before the divergence (default: rollout.temperature, "
                                         "the temperature the student samples at; mopd compares raw log-probs)", None)
    weight: float = _help("weight of this teacher's loss (loss.routing=weights)", 1.0)
    domains: List[str] = _help("data domains routed to this teacher (loss.routing=domain)", list, list)
    tokenizer: Optional[str] = _help("the teacher's tokenizer directory when it differs from the student's", None)
    projection: Optional[str] = _help("vocabulary projection file (mopd build-projection) for another tokenizer", None)
    importance_ratio_min: float = _help("mopd: lower bound of the truncated importance weight π_S/π_rollout", 0.0)
    importance_ratio_max: float = _help("mopd: upper bound of the truncated importance weight", 2.0)
    timeout_s: float = _help("seconds of silence (connecting, or waiting for any data) before a request is retried "
                             "(remote)", 300.0)
    retries: int = _help("retries of a failed request (remote)", 3)
    wait_for_servers_s: float = _help("how long to wait for the servers to become healthy at start", 120.0)
    request_deadline_s: Optional[float] = _help("seconds one attempt of a request may take in all (connect, send, "
                                                "the entire response) before a retry, however slowly the server "
                                                "sends (remote; default 2 × timeout_s)", None)

    def __post_init__(self) -> None:
        _require(bool(self.name), "every teacher needs a name (teachers.N.name)")
        where = f"teacher {self.name!r}"
        _require(self.loss in TEACHER_LOSSES, f"{where}: loss must be one of {TEACHER_LOSSES}, got {self.loss!r}")
        _require(self.placement in PLACEMENTS, f"{where}: placement must be one of {PLACEMENTS}")
        _require(self.protocol in PROTOCOLS, f"{where}: protocol must be one of {PROTOCOLS}")
        _require(self.tail in TAILS, f"{where}: tail must be one of {TAILS}")
        _require(self.topk >= 1, f"{where}: topk must be >= 1")
        _require(self.request_deadline_s is None or self.request_deadline_s > 0,
                 f"{where}: request_deadline_s must be > 0 (or unset: 2 × timeout_s)")
        _require(0.0 <= self.beta <= 1.0, f"{where}: beta must be in [0, 1], got {self.beta}")
        _require(self.temperature is None or self.temperature > 0 and math.isfinite(self.temperature),
                 f"{where}: temperature must be > 0")
        _require(self.loss != "mopd" or self.temperature in (None, 1.0),
                 f"{where}: loss mopd compares the teacher's raw log-probabilities of the sampled tokens (temperature "
                 f"1); remove teachers.N.temperature")
        _require(self.weight >= 0 and math.isfinite(self.weight), f"{where}: weight must be a finite number >= 0")
        _require(0.0 <= self.importance_ratio_min < 1.0 < self.importance_ratio_max,
                 f"{where}: need 0 <= importance_ratio_min < 1 < importance_ratio_max")
        if self.placement == "remote":
            _require(bool(self.urls) != bool(self.model),
                     f"{where}: a remote teacher needs either urls (servers you run) or model (a directory the "
                     f"trainer serves), not both")
        else:
            _require(bool(self.model) and not self.urls,
                     f"{where}: a colocated teacher needs model (a Hugging Face directory) and no urls")
            _require(self.tokenizer is None,
                     f"{where}: a colocated teacher must share the student's vocabulary; serve a teacher with "
                     f"another tokenizer remotely (placement: remote)")
        _require(self.loss != "jsd" or self.placement == "colocated",
                 f"{where}: loss jsd needs the full vocabulary, i.e. placement: colocated; a server gives top-K "
                 f"(loss: topk_jsd)")
        cross = self.tokenizer is not None
        _require(self.loss not in ("ctkd", "gold") or cross,
                 f"{where}: loss {self.loss} is for a teacher with another tokenizer: set teachers.N.tokenizer")
        _require(not cross or self.loss in ("ctkd", "gold"),
                 f"{where}: a teacher with another tokenizer needs loss ctkd or gold (through a projection)")
        _require(not cross or self.projection is not None,
                 f"{where}: a teacher with another tokenizer needs a projection file: run `mopd build-projection "
                 f"--student STUDENT_TOKENIZER --teacher {self.tokenizer} -o proj.safetensors` and set projection")


@dataclass
class RolloutConfig:
    """Where completions come from: the dataset, the student's own samples (on-policy) or a teacher's."""

    lmbda: float = _help("probability that a step samples its completions from the student (on-policy); 0: "
                         "dataset completions", 0.0)
    seq_kd: bool = _help("on the steps that are not on-policy, a remote teacher generates the completions "
                         "(sequence-level KD; routing=domain: each sample's teacher, else the first remote one)", False)
    temperature: float = _help("sampling temperature", 1.0)
    top_p: float = _help("nucleus sampling", 1.0)
    top_k: int = _help("top-k sampling (0: off)", 0)
    max_new_tokens: int = _help("completion length limit", 256)
    engine: str = _help("megatron (the student samples inside the training processes) or server (inference "
                        "servers serve the student; its weights are pushed to them before sampling)", "megatron")
    protocol: str = _help("server engine: vllm or sglang, the servers' protocol", "vllm")
    urls: List[str] = _help("server engine: servers you run, loading their weights from served_dir (vLLM with "
                            "VLLM_SERVER_DEV_MODE=1); empty: the trainer starts rollout.server on each node",
                            list, list)
    served_dir: Optional[str] = _help("server engine: the directory the student's weights are pushed to and the "
                                      "servers load (default: output_dir/rollout_model)", None)
    server: str = _help("server engine without urls: the server the trainer starts, reference (mopd "
                        "serve-teacher) or vllm (needs vLLM installed)", "reference")
    timeout_s: float = _help("server engine: seconds per request before a retry (more than the longest "
                             "generation takes)", 600.0)
    retries: int = _help("server engine: retries of a failed request", 3)
    wait_for_servers_s: float = _help("server engine: how long to wait for the servers to start and become "
                                      "healthy (vLLM takes minutes on a CPU)", 900.0)

    def __post_init__(self) -> None:
        _require(0.0 <= self.lmbda <= 1.0, f"rollout.lmbda must be in [0, 1], got {self.lmbda}")
        _require(self.temperature > 0, "rollout.temperature must be > 0")
        _require(0.0 < self.top_p <= 1.0, "rollout.top_p must be in (0, 1]")
        _require(self.top_k >= 0, "rollout.top_k must be >= 0")
        _require(self.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1")
        for name, allowed in (("engine", ROLLOUT_ENGINES), ("protocol", PROTOCOLS), ("server", ROLLOUT_SERVERS)):
            _require(getattr(self, name) in allowed,
                     f"rollout.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        _require(self.timeout_s > 0 and self.retries >= 0 and self.wait_for_servers_s >= 0,
                 "rollout: need timeout_s > 0, retries >= 0 and wait_for_servers_s >= 0")
        if self.engine != "server" or self.urls:
            return
        _require(self.server != "vllm" or self.protocol == "vllm",
                 "rollout.server=vllm speaks the vllm protocol: set rollout.protocol=vllm")
        _require(self.server != "reference" or self.protocol == "vllm" or self.top_p == 1.0,
                 "rollout.server=reference does not implement top_p in the sglang protocol: set rollout.protocol=vllm")
        if self.protocol == "vllm":
            from megatron_mopd.rollout.server_engine import logprobs_mode_for

            try:
                logprobs_mode_for(self.sampling())
            except ValueError as error:
                raise ConfigError(f"rollout: {error}") from None

    def sampling(self) -> Any:
        """The ``SamplingParams`` of this section (no stop token, seed 0)."""
        from megatron_mopd.rollout.types import SamplingParams

        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens)


@dataclass
class EvalConfig:
    """Held-out evaluation: each teacher's divergence on the student's own samples of held-out prompts."""

    path: Optional[str] = _help("JSONL of held-out prompts (same keys as data.path; completions unused); none: "
                                "no evaluation", None)
    interval: int = _help("also evaluate every this many steps (0: only before the first and after the last step)", 0)
    max_new_tokens: Optional[int] = _help("completion length limit (default: rollout.max_new_tokens)", None)
    examples: int = _help("sampled completions per domain written to report.json before and after", 2)

    def __post_init__(self) -> None:
        _require(self.interval >= 0, "eval.interval must be >= 0")
        _require(self.max_new_tokens is None or self.max_new_tokens >= 1, "eval.max_new_tokens must be >= 1")
        _require(self.examples >= 0, "eval.examples must be >= 0")


@dataclass
class CheckpointConfig:
    """Training state on disk (Megatron distributed checkpoints, atomic)."""

    interval: int = _help("save every this many steps (0: only at the end)", 0)
    resume: str = _help("auto (continue from the latest checkpoint in output_dir), none, or a checkpoint path", "auto")
    keep_last: int = _help("checkpoints kept (oldest deleted first)", 2)
    save_at_end: bool = _help("save after the last step", True)
    export_hf: bool = _help("write the trained student as a Hugging Face directory (output_dir/hf) at the end", True)

    def __post_init__(self) -> None:
        _require(self.interval >= 0, "checkpoint.interval must be >= 0")
        _require(self.keep_last >= 1, "checkpoint.keep_last must be >= 1")
        _require(bool(self.resume), "checkpoint.resume must be auto, none or a path")


@dataclass
class LoggingConfig:
    """Console, files and dashboards."""

    interval: int = _help("print one line every this many steps", 1)
    progress: bool = _help("show a progress bar", True)
    tensorboard: bool = _help("write TensorBoard events (output_dir/tensorboard) when installed", True)
    wandb_project: Optional[str] = _help("log to this Weights & Biases project when wandb is installed", None)
    plot: bool = _help("write curves.png at the end (matplotlib)", True)

    def __post_init__(self) -> None:
        _require(self.interval >= 1, "logging.interval must be >= 1")


@dataclass
class MopdConfig:
    """A distillation run."""

    output_dir: str = _help("where config.yaml, metrics.jsonl, checkpoints, report.json and curves.png go", "runs/mopd")
    seed: int = _help("random seed (data order, initialization, rollouts)", 1234)
    model: ModelConfig = _help("the student", factory=ModelConfig)
    parallel: ParallelConfig = _help("parallel layout", factory=ParallelConfig)
    data: DataConfig = _help("the dataset", factory=DataConfig)
    train: TrainConfig = _help("optimization", factory=TrainConfig)
    loss: LossConfig = _help("combining the teachers", factory=LossConfig)
    teachers: List[TeacherConfig] = _help("the teachers (none: plain fine-tuning with loss.sft_alpha)", factory=list)
    rollout: RolloutConfig = _help("completions: dataset or on-policy", factory=RolloutConfig)
    eval: EvalConfig = _help("held-out evaluation on the student's samples", factory=EvalConfig)
    checkpoint: CheckpointConfig = _help("checkpoints", factory=CheckpointConfig)
    logging: LoggingConfig = _help("logging", factory=LoggingConfig)

    def __post_init__(self) -> None:
        _require(len(self.teachers) >= 1 or self.loss.sft_alpha > 0,
                 "teachers: configure at least one teacher (or loss.sft_alpha > 0 for plain fine-tuning)")
        names = [t.name for t in self.teachers]
        _require(len(set(names)) == len(names), f"teacher names must be distinct, got {names}")
        if self.loss.routing == "domain":
            seen: dict[str, str] = {}
            for teacher in self.teachers:
                _require(bool(teacher.domains),
                         f"loss.routing=domain: teacher {teacher.name!r} lists no domains (teachers.N.domains)")
                for domain in teacher.domains:
                    _require(domain not in seen,
                             f"domain {domain!r} is routed to both {seen.get(domain)!r} and {teacher.name!r}")
                    seen[domain] = teacher.name
        _require(not self.rollout.seq_kd or any(t.placement == "remote" for t in self.teachers),
                 "rollout.seq_kd needs a remote teacher to generate the completions")
        _require(not self.rollout.seq_kd or self.loss.routing == "weights" or all(
            t.placement == "remote" for t in self.teachers),
                 "rollout.seq_kd with loss.routing=domain: each sample's own teacher generates its completion, so "
                 "every teacher must be remote")
        if self.loss.fused_output_layer:
            logits_losses = [f"{t.name!r} ({t.loss})" for t in self.teachers if t.loss not in FUSED_OUTPUT_LAYER_LOSSES]
            _require(not logits_losses,
                     f"loss.fused_output_layer computes the losses {', '.join(FUSED_OUTPUT_LAYER_LOSSES)} (and "
                     f"loss.sft_alpha) without the student's logits; teacher(s) {', '.join(logits_losses)} need the "
                     f"logits: set loss.fused_output_layer=false")
        default_teacher_temperatures(self.teachers, self.rollout.temperature)


def default_teacher_temperatures(teachers: Sequence[TeacherConfig], sampling_temperature: float) -> None:
    """Set each teacher's unset ``temperature`` (in place): the temperature the student samples at, as in
    TRL's and ms-swift's GKD (one temperature for sampling and for the divergence); 1 for ``mopd``, which
    compares the raw log-probabilities of the sampled tokens."""
    for teacher in teachers:
        if teacher.temperature is None:
            teacher.temperature = 1.0 if teacher.loss == "mopd" else sampling_temperature


def _structured() -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.structured(MopdConfig)


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> MopdConfig:
    """The schema's defaults, merged with the YAML file at ``path``, then the dotted ``overrides``
    (``key.sub=value``, ``teachers.0.topk=64``; values are parsed as YAML).

    Raises:
        ConfigError: an unknown key, a value of the wrong type, an override without ``=``, or a value
            a section's ``__post_init__`` rejects.
        OSError: the file cannot be read.
    """
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register_resolvers()
    try:
        merged = _structured()
        if path is not None:
            loaded = OmegaConf.load(path)
            merged = OmegaConf.merge(merged, loaded)
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-5")
            OmegaConf.update(merged, key.strip(), yaml.safe_load(value), merge=True)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(_describe(error, path)) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path or 'override'}: not valid YAML: {error}") from None


def _describe(error: Any, path: Optional[str | Path]) -> str:
    key = getattr(error, "full_key", None)
    message = str(getattr(error, "msg", error)).splitlines()[0]
    if "missing mandatory value" in message.lower():
        message = f"{key} is required: {_field_help(key)}"
    source = f"{path}: " if path else ""
    return f"{source}{message}" + (f" (at {key})" if key and key not in message else "")


def _field_help(key: Optional[str]) -> str:
    section, _, name = (key or "").rpartition(".")
    cls = _SECTIONS.get(section.split("[")[0], MopdConfig)
    fields = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
    return fields.get(name, "set it in the YAML file or as key=value")


def save_config(config: MopdConfig, path: str | Path) -> None:
    """Write the resolved configuration as YAML (atomically)."""
    from omegaconf import OmegaConf

    from megatron_mopd.trainer.files import atomic_write_text

    atomic_write_text(Path(path), OmegaConf.to_yaml(OmegaConf.structured(config)))


def as_dict(config: MopdConfig) -> dict[str, Any]:
    """The configuration as plain Python containers (for checkpoints and reports)."""
    return dataclasses.asdict(config)


def config_reference() -> str:
    """Every field with its default and help, one line each, grouped by section (``--help-config``)."""
    lines = []

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            help_text = f.metadata.get("help", "")
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            section = _SECTIONS.get(f.name) if cls is MopdConfig else None
            if section is not None:
                lines.append(f"\n{prefix}{f.name}: {help_text}")
                walk(section, f"{prefix}{f.name}{'.N' if f.name == 'teachers' else ''}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            indent = "  " if prefix else ""
            lines.append(f"{indent}{prefix}{f.name} = {default!r}  ({kind}) {help_text}")

    walk(MopdConfig, "")
    return "\n".join(lines).strip() + "\n"


_SECTIONS: dict[str, type] = {
    "model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig, "train": TrainConfig, "loss": LossConfig,
    "teachers": TeacherConfig, "rollout": RolloutConfig, "eval": EvalConfig, "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}

_resolvers_registered = False


def register_resolvers() -> None:
    """``${demo:NAME}`` in a config resolves to a demo asset path (built and cached on first use)."""
    global _resolvers_registered
    if _resolvers_registered:
        return
    from omegaconf import OmegaConf

    def demo_asset(name: str) -> str:
        from megatron_mopd.demo.assets import demo_asset_path

        return str(demo_asset_path(name))

    OmegaConf.register_resolver("demo", demo_asset, use_cache=True)
    _resolvers_registered = True
