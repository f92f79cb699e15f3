"""Specification of the trainer's configuration: YAML + dotted overrides into one typed schema, and every
configuration error up front with a message naming the field and the fix."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_mopd.models import GPTArchitecture
from megatron_mopd.trainer.config import ConfigError, MopdConfig, config_reference, load_config, save_config
from megatron_mopd.trainer.loop import Layout, _check_layout

MINIMAL = ["model.path=/models/student", "data.path=/data/train.jsonl", "teachers=[{name: t, urls: [http://h:8000]}]"]


def test_yaml_and_dotted_overrides_merge_into_the_typed_schema(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model: {path: /m}\ndata: {path: /d.jsonl}\ntrain: {lr: 1.0e-4}\n"
                    "teachers:\n  - {name: a, urls: [http://h:1]}\n  - {name: b, urls: [http://h:2], loss: mopd}\n")
    config = load_config(path, ["train.lr=1e-5", "teachers.0.topk=64", "teachers.1.weight=0.5", "output_dir=/out"])
    assert isinstance(config, MopdConfig)
    assert config.train.lr == 1e-5 and config.teachers[0].topk == 64 and config.teachers[1].weight == 0.5
    assert config.output_dir == "/out" and config.checkpoint.resume == "auto"


def test_the_resolved_config_round_trips_through_config_yaml(tmp_path: Path) -> None:
    config = load_config(None, MINIMAL + ["train.steps=7"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_the_keys_scripts_rely_on_keep_their_names() -> None:
    config = load_config(None, MINIMAL + ["output_dir=/o", "train.steps=3", "checkpoint.interval=2",
                                          "checkpoint.resume=auto"])
    assert (config.output_dir, config.train.steps, config.checkpoint.interval, config.checkpoint.resume) == \
        ("/o", 3, 2, "auto")


def test_every_field_has_help_and_the_documented_reference_is_the_schemas() -> None:
    reference = config_reference()
    for section in dataclasses.fields(MopdConfig):
        assert section.metadata["help"]
    assert "teachers.N.topk" in reference and "checkpoint.resume" in reference
    documented = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    assert reference in documented, "regenerate docs/configuration.md with `mopd train --help-config`"


@pytest.mark.parametrize("overrides, message", [
    (["train.foo=1"], r"Key 'foo' not in 'TrainConfig' \(at train.foo\)"),
    (["teachers.0.topk=many"], r"could not be converted to Integer \(at teachers\[0\].topk\)"),
    (["train.lr"], "expected key=value"),
    (["train.steps=0"], "train.steps must be >= 1"),
    (["rollout.lmbda=1.5"], r"rollout.lmbda must be in \[0, 1\]"),
    (["teachers.0.beta=2"], r"teacher 't': beta must be in \[0, 1\]"),
    (["teachers.0.model=/models/teacher"], "either urls .* or model"),
    (["teachers.0.loss=jsd"], "loss jsd needs the full vocabulary, i.e. placement: colocated"),
    (["teachers.0.tokenizer=/tok/other"], "needs loss ctkd or gold"),
    (["teachers.0.tokenizer=/tok/other", "teachers.0.loss=gold"],
     "mopd build-projection --student .* --teacher /tok/other"),
    (["teachers.0.loss=ctkd"], "is for a teacher with another tokenizer: set teachers.N.tokenizer"),
    (["teachers.0.placement=colocated", "teachers.0.urls=[]", "teachers.0.model=/m", "teachers.0.tokenizer=/x",
      "teachers.0.loss=gold", "teachers.0.projection=/p"], "must share the student's vocabulary"),
    (["loss.routing=domain"], "teacher 't' lists no domains"),
    (["teachers=[{name: a, urls: [u]}, {name: a, urls: [v]}]"], "teacher names must be distinct"),
    (["parallel.tp=0"], "parallel.tp must be >= 1"),
    (["train.precision=fp8"], "train.precision must be one of"),
    (["teachers.0.loss=mopd", "teachers.0.temperature=0.7"], "loss mopd compares the teacher's raw log-probabilities"),
    (["rollout.seq_kd=true", "teachers.0.placement=colocated", "teachers.0.urls=[]", "teachers.0.model=/m"],
     "rollout.seq_kd needs a remote teacher"),
    (["eval.interval=-1"], "eval.interval must be >= 0"),
])
def test_a_bad_configuration_is_refused_naming_the_field(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, MINIMAL + overrides)


def test_a_teachers_temperature_defaults_to_the_sampling_temperature() -> None:
    config = load_config(None, MINIMAL + ["rollout.temperature=0.8",
                                          "teachers=[{name: a, urls: [u]}, {name: b, urls: [v], loss: mopd},"
                                          " {name: c, urls: [w], temperature: 2.0}]"])
    assert [t.temperature for t in config.teachers] == [0.8, 1.0, 2.0]  # mopd: the raw log-probabilities


def test_a_required_path_is_named() -> None:
    with pytest.raises(ConfigError, match="model.path"):
        load_config(None, MINIMAL[1:])


ARCH = GPTArchitecture(hf_model_type="llama", vocab_size=100, num_layers=2, hidden_size=64, ffn_hidden_size=128,
                       num_attention_heads=4, num_query_groups=2, kv_channels=16, max_position_embeddings=128)
CPU_DP1 = Layout(dp_rank=0, dp_size=1, reporting=True, fetching=True, device_type="cpu")


@pytest.mark.parametrize("overrides, layout, message", [
    (["parallel.tp=4"], CPU_DP1, "parallel.tp=4 must divide the model's 2 key/value heads"),
    (["parallel.tp=8"], CPU_DP1, "parallel.tp=8 must divide the model's 4 attention heads"),
    (["parallel.pp=4"], CPU_DP1, "parallel.pp=4 must divide the model's 2 layers"),
    (["train.global_batch_size=6", "train.micro_batch_size=2"], dataclasses.replace(CPU_DP1, dp_size=2),
     r"train.global_batch_size=6 must be a multiple of train.micro_batch_size \(2\) x data-parallel size \(2\)"),
    (["data.seq_length=256"], CPU_DP1, "exceeds the model's 128 positions"),
    (["parallel.cp=2"], CPU_DP1, "parallel.cp > 1 needs Transformer Engine's context-parallel attention"),
    (["train.precision=bf16"], CPU_DP1, "bf16 needs CUDA or NPU"),
])
def test_sizes_that_do_not_fit_the_job_or_the_model_are_refused(overrides, layout, message) -> None:
    config = load_config(None, MINIMAL + ["data.seq_length=64"] + overrides)
    with pytest.raises(ConfigError, match=message):
        _check_layout(config, ARCH, layout)
