"""``--mopd-*`` flags for Megatron-LM's ``extra_args_provider``, read into the trainer's teacher schema.

    pretrain(..., extra_args_provider=add_mopd_args)
    config = mopd_config_from_args(get_args())     # MegatronLMMopdConfig: teachers + loss

The teachers are described in one of two ways, both giving ``trainer.config``'s ``TeacherConfig`` and
``LossConfig`` (the same fields, defaults and error messages as ``mopd train``):

* ``--mopd-config FILE``: a YAML file with a ``teachers:`` list and optionally a ``loss:`` section, as
  in a ``mopd train`` configuration. Its other sections (model, data, train, ...) are refused: under
  Megatron-LM its own flags set them.
* one teacher from flags: ``--mopd-teacher-url URL`` (repeat it for several servers of the teacher),
  with ``--mopd-teacher-name``, ``--mopd-teacher-protocol``, ``--mopd-loss``, ``--mopd-topk``,
  ``--mopd-beta``, ``--mopd-tail`` and ``--mopd-temperature``. Each value is checked on its own first,
  so an error names its flag.

``--mopd-sft-alpha`` sets ``loss.sft_alpha`` either way, and ``--mopd-override key=value``
(repeatable, dotted, YAML values: ``teachers.0.weight=0.5``) applies last, as ``mopd train``'s
overrides do.

Megatron-LM flags the distillation loss cannot honour yet are refused here too, naming the flag:
context parallelism, virtual pipeline stages, packed or document-masked sequences (``--sft``,
``--reset-attention-mask``, ``--reset-position-ids``), multi-token prediction, and a run without
``--calculate-per-token-loss``.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, List, NamedTuple, Optional

from megatron_mopd.trainer.config import (
    PROTOCOLS,
    TAILS,
    ConfigError,
    LossConfig,
    TeacherConfig,
    default_teacher_temperatures,
    register_resolvers,
)

__all__ = ["MegatronLMMopdConfig", "add_mopd_args", "mopd_config_from_args"]

FLAG_TEACHER_LOSSES = ("topk_jsd", "mopd")  # the losses a remote teacher with the student's tokenizer supports
DEFAULT_TEACHER_NAME = "teacher"


@dataclass
class MegatronLMMopdConfig:
    """What the ``--mopd-*`` flags configure: the teachers and how their losses combine."""

    teachers: List[TeacherConfig] = field(default_factory=list, metadata={"help": "the teachers (at least one)"})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "combining the teachers"})

    def __post_init__(self) -> None:
        _require(bool(self.teachers),
                 "no teacher: give --mopd-teacher-url URL (a vLLM, SGLang or `mopd serve-teacher` server) or "
                 "--mopd-config FILE with a teachers: list")
        names = [t.name for t in self.teachers]
        _require(len(set(names)) == len(names), f"teacher names must be distinct, got {names}")
        _require(self.loss.routing == "weights",
                 "loss.routing=domain needs each sample's domain, which Megatron-LM's datasets do not carry: "
                 "use loss.routing=weights")
        for teacher in self.teachers:
            where = f"teacher {teacher.name!r}"
            _require(teacher.placement == "remote",
                     f"{where}: placement colocated is not available under Megatron-LM yet; serve the model "
                     f"(`mopd serve-teacher --model DIR`) and give its URL")
            _require(teacher.tokenizer is None,
                     f"{where}: a teacher with another tokenizer needs each sample's text, which Megatron-LM's "
                     f"datasets do not carry; distill it with `mopd train`")
        default_teacher_temperatures(self.teachers, 1.0)  # off-policy: nothing is sampled


class _Flag(NamedTuple):
    flag: str
    field: str
    type: Callable[[str], Any]
    choices: Optional[tuple[str, ...]] = None
    help: Optional[str] = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def metavar(self) -> Optional[str]:
        return None if self.choices else {str: "NAME", int: "K"}.get(self.type, "X")


_TEACHER_FLAGS = (
    _Flag("--mopd-teacher-name", "name", str),
    _Flag("--mopd-teacher-protocol", "protocol", str, PROTOCOLS),
    _Flag("--mopd-loss", "loss", str, FLAG_TEACHER_LOSSES,
          "topk_jsd (generalized JSD against the teacher's top-K) or mopd (sampled-token advantage)"),
    _Flag("--mopd-topk", "topk", int),
    _Flag("--mopd-beta", "beta", float),
    _Flag("--mopd-tail", "tail", str, TAILS),
    _Flag("--mopd-temperature", "temperature", float),
)


def add_mopd_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``mopd`` argument group to Megatron-LM's parser; returns the parser (``extra_args_provider``)."""
    group = parser.add_argument_group(title="mopd", description="multi-teacher distillation (megatron_mopd)")
    group.add_argument("--mopd-config", metavar="FILE", default=None,
                       help="YAML file with a teachers: list and optionally a loss: section (the schema of "
                            "`mopd train`); replaces the one-teacher flags")
    group.add_argument("--mopd-override", metavar="KEY=VALUE", action="append", default=[],
                       help="dotted override applied last, e.g. teachers.0.weight=0.5 (repeatable)")
    group.add_argument("--mopd-teacher-url", metavar="URL", action="append", default=[],
                       help="a server of the one teacher (repeatable: several servers of the same teacher)")
    for flag in _TEACHER_FLAGS:
        group.add_argument(flag.flag, type=flag.type, choices=flag.choices, default=None, metavar=flag.metavar,
                           help=_field_help(TeacherConfig, flag.field, flag.help,
                                            DEFAULT_TEACHER_NAME if flag.field == "name" else None))
    group.add_argument("--mopd-sft-alpha", type=float, default=None, metavar="X",
                       help=_field_help(LossConfig, "sft_alpha"))
    return parser


def mopd_config_from_args(args: argparse.Namespace) -> MegatronLMMopdConfig:
    """The teachers and loss configured by ``args`` (Megatron-LM's, with the ``--mopd-*`` flags).

    Raises:
        ConfigError: a flag value, the file, an override or their combination cannot run; the message
            names the flag (or the file and key) and the fix.
    """
    from omegaconf import OmegaConf

    _check_megatron_args(args)
    register_resolvers()
    merged = OmegaConf.structured(MegatronLMMopdConfig)
    if args.mopd_config:
        given = [flag.flag for flag in _TEACHER_FLAGS if getattr(args, flag.dest) is not None]
        given = (["--mopd-teacher-url"] if args.mopd_teacher_url else []) + given
        if given:
            raise ConfigError(f"{given[0]}: the one-teacher flags cannot be combined with --mopd-config; set the "
                              f"teacher in {args.mopd_config} or with --mopd-override teachers.N.FIELD=VALUE")
        source = f"--mopd-config {args.mopd_config}"
        merged = _merge(merged, _read_file(args.mopd_config), source)
    else:
        source = "the --mopd-teacher-* flags"
        merged = _merge(merged, {"teachers": _flag_teachers(args)}, source)
    if args.mopd_sft_alpha is not None:
        _check_flag("--mopd-sft-alpha", args.mopd_sft_alpha, lambda value: LossConfig(sft_alpha=value))
        merged = _merge(merged, {"loss": {"sft_alpha": args.mopd_sft_alpha}}, "--mopd-sft-alpha")
    for item in args.mopd_override:
        merged = _override(merged, item)
    if args.mopd_override:
        source += f" with --mopd-override {' '.join(args.mopd_override)}"
    return _to_object(merged, source)


def _check_megatron_args(args: argparse.Namespace) -> None:
    cp = getattr(args, "context_parallel_size", 1) or 1
    _require(cp == 1, f"--context-parallel-size {cp}: context parallelism is not supported by the MOPD loss yet "
                      f"(the teachers score whole sequences); use tensor, pipeline or data parallelism")
    vp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    _require(vp is None, f"--num-layers-per-virtual-pipeline-stage / --num-virtual-stages-per-pipeline-rank "
                         f"(virtual pipeline size {vp}): virtual pipeline stages are not supported by the MOPD "
                         f"loss yet; use the plain pipeline schedule")
    _require(getattr(args, "calculate_per_token_loss", True) is not False,
             "--calculate-per-token-loss is required: the MOPD loss returns (sum, completion tokens) per "
             "micro-batch, and Megatron divides by the global batch's completion tokens only with this flag")
    for flag, dest in (("--sft", "sft"), ("--reset-attention-mask", "reset_attention_mask"),
                       ("--reset-position-ids", "reset_position_ids")):
        _require(not getattr(args, dest, False),
                 f"{flag}: several documents per row are not supported by the MOPD loss yet (the teachers score "
                 f"each row as one sequence); train on unpacked rows")
    mtp = getattr(args, "mtp_num_layers", None)
    _require(not mtp, f"--mtp-num-layers {mtp}: multi-token prediction is not supported by the MOPD loss yet")


def _flag_teachers(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The one teacher of the flags (none without ``--mopd-teacher-url``), each value checked on its own."""
    urls = list(args.mopd_teacher_url)
    given = {flag: getattr(args, flag.dest) for flag in _TEACHER_FLAGS if getattr(args, flag.dest) is not None}
    if not urls:
        if given:
            raise ConfigError(f"{next(iter(given)).flag} describes the teacher of --mopd-teacher-url: give "
                              f"--mopd-teacher-url URL too, or use --mopd-config FILE")
        return []
    base = {"name": DEFAULT_TEACHER_NAME, "urls": urls}
    for flag, value in given.items():
        _check_flag(flag.flag, value, lambda v, name=flag.field: TeacherConfig(**{**base, name: v}))
    return [{**base, **{flag.field: value for flag, value in given.items()}}]


def _check_flag(flag: str, value: Any, build: Callable[[Any], Any]) -> None:
    try:
        build(value)
    except ConfigError as error:
        raise ConfigError(f"{flag} {value!r}: {error}") from None


def _read_file(path: str) -> Any:
    import yaml
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        loaded = OmegaConf.load(path)
    except OSError as error:
        raise ConfigError(f"--mopd-config {path}: cannot read it ({error.strerror or error})") from None
    except (yaml.YAMLError, OmegaConfBaseException) as error:
        raise ConfigError(f"--mopd-config {path}: not valid YAML: {error}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"--mopd-config {path}: expected a mapping with a teachers: list")
    known = {f.name for f in dataclasses.fields(MegatronLMMopdConfig)}
    unknown = sorted(set(loaded.keys()) - known)
    if unknown:
        raise ConfigError(f"--mopd-config {path}: section {unknown[0]!r} is not read under Megatron-LM, whose own "
                          f"flags set the model, data and optimizer; keep only {sorted(known)}")
    return loaded


def _merge(merged: Any, update: Any, source: str) -> Any:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.merge(merged, update)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{source}: {_describe(error)}") from None


def _override(merged: Any, item: str) -> Any:
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--mopd-override {item!r}: expected key=value, e.g. teachers.0.topk=64")
    try:
        OmegaConf.update(merged, key.strip(), yaml.safe_load(value), merge=True)
    except (OmegaConfBaseException, yaml.YAMLError) as error:
        raise ConfigError(f"--mopd-override {item}: {_describe(error)}") from None
    return merged


def _to_object(merged: Any, source: str) -> MegatronLMMopdConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{source}: {_describe(error)}") from None
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def _describe(error: Exception) -> str:
    key = getattr(error, "full_key", None)
    message = str(getattr(error, "msg", error)).splitlines()[0]
    return message + (f" (at {key})" if key and key not in message else "")


def _field_help(cls: type, name: str, text: Optional[str] = None, default: Any = None) -> str:
    spec = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = spec.default if default is None else default
    return f"{text or spec.metadata.get('help', '')} (default: {default})"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
