"""Specification: Megatron-LM users distill with ``add_mopd_args`` and ``MopdForwardStep``
(``megatron_mopd.integrations.megatron_lm``), and ``examples/megatron_lm/pretrain_gpt_mopd.py``.

- ``add_mopd_args`` (Megatron-LM's ``extra_args_provider``) parses the ``--mopd-*`` flags into the
  trainer's ``TeacherConfig`` / ``LossConfig``; ``--mopd-config`` reads the ``teachers:`` and ``loss:``
  sections of a ``mopd train`` file; ``--mopd-override`` applies last. Every error names its flag (or the
  file), and Megatron-LM flags the loss cannot honour are refused by name.
- ``MopdForwardStep`` keeps Megatron's ``forward_step`` contract through Megatron-Core's schedule (what
  ``pretrain()`` calls: ``get_forward_backward_func`` with ``calculate_per_token_loss``, DDP, the
  Megatron optimizer), on the demo student with a real reference teacher server on the demo teacher.
  The data iterator yields Megatron-LM's dicts (tokens, labels, loss_mask, attention_mask,
  position_ids). Per micro-batch: the teacher scores each row up to its last trained position, and
  the logs the schedule reports equal ``micro_batch_objective`` on the same logits and teacher scores,
  with labels −100 outside the loss mask; an update on the same batch lowers the MOPD teacher's KL; TP=2
  reports the TP=1 numbers (relative 1e-5). A last stage without tokens is an error that says how to
  fix ``get_batch``.
- The example compiles (``megatron.training`` is not installed here) and names only real flags.
"""

from __future__ import annotations

import argparse
import ast
import py_compile
import re
from pathlib import Path

import pytest
import torch

from megatron_mopd.integrations.megatron_lm import (
    MegatronLMMopdConfig,
    MopdForwardStep,
    add_mopd_args,
    mopd_config_from_args,
)
from megatron_mopd.platform import destroy_parallel, initialize_parallel
from megatron_mopd.testing import run_on_ranks
from megatron_mopd.trainer.config import ConfigError, LossConfig, TeacherConfig

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU mode runs only on hosts without an accelerator")

EXAMPLE = Path(__file__).parents[1] / "examples" / "megatron_lm" / "pretrain_gpt_mopd.py"
URL = "http://teacher:8000"
SEED, SEQ_LEN, MICRO_BATCH, NUM_MICROBATCHES, LR = 1234, 32, 2, 2, 3e-3
SFT_ALPHA = 0.1


def parse(*argv: str) -> argparse.Namespace:
    return add_mopd_args(argparse.ArgumentParser(allow_abbrev=False)).parse_args(list(argv))


def config_of(*argv: str) -> MegatronLMMopdConfig:
    return mopd_config_from_args(parse(*argv))


def teachers_file(path: Path, url: str) -> Path:
    """Two teachers on one server: the top-K JSD and the sampled-token MOPD loss at half weight."""
    path.write_text(f"teachers:\n"
                    f"  - {{name: reference, urls: [{url}], loss: topk_jsd, topk: 16, beta: 0.5}}\n"
                    f"  - {{name: advantage, urls: [{url}], loss: mopd, topk: 16, weight: 0.5}}\n"
                    f"loss:\n  sft_alpha: {SFT_ALPHA}\n")
    return path


# ----------------------------------------------------------------------------------------- flags


def test_the_flags_configure_one_teacher_in_the_trainers_schema() -> None:
    config = config_of("--mopd-teacher-url", URL, "--mopd-teacher-url", "http://teacher:8001",
                       "--mopd-teacher-name", "big", "--mopd-teacher-protocol", "sglang", "--mopd-loss", "topk_jsd",
                       "--mopd-topk", "32", "--mopd-beta", "0.25", "--mopd-tail", "renorm",
                       "--mopd-temperature", "0.7", "--mopd-sft-alpha", "0.3")
    assert config.teachers == [TeacherConfig(name="big", urls=[URL, "http://teacher:8001"], protocol="sglang",
                                             loss="topk_jsd", topk=32, beta=0.25, tail="renorm", temperature=0.7)]
    assert config.loss == LossConfig(sft_alpha=0.3)


def test_unset_flags_keep_the_schemas_defaults() -> None:
    config = config_of("--mopd-teacher-url", URL)
    assert config.teachers == [TeacherConfig(name="teacher", urls=[URL], temperature=1.0)]
    assert config.loss == LossConfig()


def test_a_file_holds_the_teachers_and_loss_sections_and_overrides_apply_last(tmp_path: Path) -> None:
    path = teachers_file(tmp_path / "teachers.yaml", URL)
    config = config_of("--mopd-config", str(path), "--mopd-override", "teachers.1.weight=0.25",
                       "--mopd-override", "teachers.0.urls=[http://other:1]")
    assert [(t.name, t.loss, t.weight, t.urls) for t in config.teachers] == [
        ("reference", "topk_jsd", 1.0, ["http://other:1"]), ("advantage", "mopd", 0.25, [URL])]
    assert config.loss.sft_alpha == SFT_ALPHA


@pytest.mark.parametrize("argv, message", [
    ([], r"no teacher: give --mopd-teacher-url URL .* or --mopd-config FILE"),
    (["--mopd-topk", "8"], "--mopd-topk describes the teacher of --mopd-teacher-url: give --mopd-teacher-url"),
    (["--mopd-teacher-url", URL, "--mopd-beta", "2"], r"--mopd-beta 2.0: teacher 'teacher': beta must be in \[0, 1\]"),
    (["--mopd-teacher-url", URL, "--mopd-topk", "0"], "--mopd-topk 0: teacher 'teacher': topk must be >= 1"),
    (["--mopd-teacher-url", URL, "--mopd-temperature", "0"], "--mopd-temperature 0.0: .*temperature must be > 0"),
    (["--mopd-teacher-url", URL, "--mopd-teacher-name", ""], "--mopd-teacher-name '': every teacher needs a name"),
    (["--mopd-teacher-url", URL, "--mopd-sft-alpha", "-1"], "--mopd-sft-alpha -1.0: loss.sft_alpha must be"),
    (["--mopd-teacher-url", URL, "--mopd-override", "teachers.0.topc=3"],
     r"--mopd-override teachers.0.topc=3: Key 'topc' not in 'TeacherConfig'"),
    (["--mopd-teacher-url", URL, "--mopd-override", "teachers.0.weight"], "--mopd-override .*expected key=value"),
    (["--mopd-teacher-url", URL, "--mopd-override", "teachers.0.weight=-1"],
     "--mopd-teacher-\\* flags with --mopd-override teachers.0.weight=-1: teacher 'teacher': weight must be"),
    (["--mopd-teacher-url", URL, "--mopd-override", "loss.routing=domain"],
     "loss.routing=domain needs each sample's domain, which Megatron-LM's datasets do not carry"),
])
def test_an_error_names_the_flag_and_the_fix(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_of(*argv)


def test_argparse_refuses_a_choice_the_integration_cannot_run(capsys) -> None:
    with pytest.raises(SystemExit):
        parse("--mopd-teacher-url", URL, "--mopd-loss", "jsd")  # jsd needs the full vocabulary: colocated
    assert "argument --mopd-loss: invalid choice: 'jsd'" in capsys.readouterr().err


@pytest.mark.parametrize("text, extra, message", [
    ("teachers: [{name: a, urls: [u], beta: 2}]\n", [], r"--mopd-config .*teachers.yaml: teacher 'a': beta must be"),
    ("model: {path: /m}\nteachers: [{name: a, urls: [u]}]\n", [],
     r"section 'model' is not read under Megatron-LM, whose own flags set the model"),
    ("teachers: [{name: a, urls: [u], topc: 3}]\n", [], r"Key 'topc' not in 'TeacherConfig'"),
    ("teachers: [{name: a, urls: [u]}]\n", ["--mopd-topk", "8"],
     "--mopd-topk: the one-teacher flags cannot be combined with --mopd-config"),
    ("teachers: [{name: a, urls: [u]}]\n", ["--mopd-teacher-url", URL], "--mopd-teacher-url: the one-teacher flags"),
    ("teachers: [{name: a, placement: colocated, model: /m, loss: jsd}]\n", [],
     "teacher 'a': placement colocated is not available under Megatron-LM yet"),
    ("teachers: [{name: a, urls: [u], loss: gold, tokenizer: /t, projection: /p}]\n", [],
     "teacher 'a': a teacher with another tokenizer needs each sample's text"),
])
def test_a_files_errors_name_the_file_and_the_key(tmp_path: Path, text: str, extra: list[str], message: str) -> None:
    path = tmp_path / "teachers.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config_of("--mopd-config", str(path), *extra)


def test_a_missing_file_is_named() -> None:
    with pytest.raises(ConfigError, match="--mopd-config /no/such.yaml: cannot read it"):
        config_of("--mopd-config", "/no/such.yaml")


@pytest.mark.parametrize("dest, value, message", [
    ("context_parallel_size", 2, "--context-parallel-size 2: context parallelism is not supported"),
    ("virtual_pipeline_model_parallel_size", 2, "virtual pipeline stages are not supported"),
    ("calculate_per_token_loss", False, "--calculate-per-token-loss is required"),
    ("sft", True, "--sft: several documents per row are not supported"),
    ("reset_attention_mask", True, "--reset-attention-mask: several documents per row"),
    ("reset_position_ids", True, "--reset-position-ids: several documents per row"),
    ("mtp_num_layers", 1, "--mtp-num-layers 1: multi-token prediction is not supported"),
])
def test_megatron_lm_flags_the_loss_cannot_honour_are_refused_by_name(dest: str, value, message: str) -> None:
    args = parse("--mopd-teacher-url", URL)
    setattr(args, dest, value)
    with pytest.raises(ConfigError, match=message):
        mopd_config_from_args(args)


# ---------------------------------------------------------------- forward_step through the schedule


def megatron_lm_batches() -> list[dict[str, torch.Tensor]]:
    """NUM_MICROBATCHES micro-batches as Megatron's GPT datasets make them from demo prompt/completion
    pairs: ``labels`` = ``tokens`` shifted by one, ``loss_mask`` 1 on completion labels only (0 on the
    prompt and the padding); rows of SEQ_LEN + 1 tokens, two cut there and two keeping only the first
    few completion tokens, then padded."""
    import json

    from transformers import AutoTokenizer

    from megatron_mopd.demo.assets import demo_asset_path

    tokenizer = AutoTokenizer.from_pretrained(demo_asset_path("tokenizer"))
    records = [json.loads(line) for line in demo_asset_path("data").read_text().splitlines()]
    rows, masks = [], []
    for record, kept in zip(records, (None, 4, 9, None)):
        prompt = tokenizer(record["prompt"])["input_ids"]
        completion = tokenizer(record["completion"])["input_ids"][:kept]
        ids = (prompt + completion)[:SEQ_LEN + 1]
        trained = [False] * len(prompt) + [True] * (len(ids) - len(prompt))  # trained[i]: token i is completion
        pad = SEQ_LEN + 1 - len(ids)
        rows.append(ids + [tokenizer.pad_token_id] * pad)
        masks.append(trained[1:] + [False] * pad)  # loss_mask[j] covers labels[j] = token j + 1
    full, loss_mask = torch.tensor(rows), torch.tensor(masks, dtype=torch.float32)
    causal = ~torch.tril(torch.ones(SEQ_LEN, SEQ_LEN, dtype=torch.bool))
    return [{"tokens": full[i:i + MICRO_BATCH, :-1], "labels": full[i:i + MICRO_BATCH, 1:],
             "loss_mask": loss_mask[i:i + MICRO_BATCH], "attention_mask": causal.expand(MICRO_BATCH, 1, -1, -1),
             "position_ids": torch.arange(SEQ_LEN).expand(MICRO_BATCH, -1)}
            for i in range(0, NUM_MICROBATCHES * MICRO_BATCH, MICRO_BATCH)]


def megatron_lm_get_batch(data_iterator):
    """Megatron-LM's ``get_batch`` order. Here every TP rank reads the same data; Megatron-LM reads on TP
    rank 0 and broadcasts."""
    batch = next(data_iterator)
    return batch["tokens"], batch["labels"], batch["loss_mask"], batch["attention_mask"], batch["position_ids"]


def distill(tp: int, teachers_yaml: str) -> dict | None:
    """Two optimizer steps on the same global batch through Megatron-Core's schedule; on TP rank 0, per
    step and micro-batch, the logs the schedule reported and those of ``micro_batch_objective``."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_mopd.demo.assets import demo_asset_path
    from megatron_mopd.models import GPTArchitecture, load_hf_weights
    from megatron_mopd.trainer.objective import Targets, TeacherTerm, micro_batch_objective

    torch.set_num_threads(1)
    initialize_parallel(tp, 1, device="cpu", seed=SEED)
    try:
        student = demo_asset_path("student")
        arch = GPTArchitecture.from_hf_config(student, make_vocab_size_divisible_by=64)
        model = arch.build(tp, 1)
        load_hf_weights(model, student, arch)
        config = model.config
        config.calculate_per_token_loss = True  # --calculate-per-token-loss
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
        optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=LR, clip_grad=0.0), [ddp])
        config.grad_scale_func = optimizer.scale_loss
        config.finalize_model_grads_func = finalize_model_grads

        args = parse("--mopd-config", teachers_yaml)
        mopd = MopdForwardStep(megatron_lm_get_batch, args=args, vocab_size=arch.vocab_size)
        batches = megatron_lm_batches()
        expected: list[dict] = []

        def recording_forward_step(data_iterator, model):
            logits, loss_func = mopd(data_iterator, model)
            micro_batch = loss_func.args[0]
            source = batches[len(expected) % NUM_MICROBATCHES]

            def recorded(output):
                reported = loss_func(output)
                scores = [teacher.scores() for teacher in micro_batch.context.teachers]
                labels = torch.where(source["loss_mask"] > 0, source["labels"], -100)
                every_row = torch.ones(MICRO_BATCH, dtype=torch.bool)
                parts = micro_batch_objective(
                    output.detach(), Targets(labels, torch.ones(MICRO_BATCH, dtype=torch.bool)),
                    [TeacherTerm(t, s, every_row) for t, s in zip(mopd.config.teachers, scores)],
                    sft_alpha=SFT_ALPHA, vocab_size=arch.vocab_size)
                expected.append({
                    "loss": [float(parts.loss_sum), float(parts.num_tokens)],
                    **{f"divergence/{name}": [float(s), float(c)] for name, (s, c) in parts.divergences.items()},
                    "sft/nll": [float(parts.sft[0]), float(parts.sft[1])],
                    "scored": [[list(sequence) for sequence in s.sequences] for s in scores],
                    "loss_returned": float(reported[0]), "tokens_returned": int(reported[1]),
                })
                return reported

            return logits, recorded

        forward_backward = get_forward_backward_func()
        reported = []
        for step in range(2):
            args.curr_iteration = step  # as Megatron-LM's train loop sets it
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            logs = forward_backward(forward_step_func=recording_forward_step, data_iterator=iter(batches),
                                    model=[ddp], num_microbatches=NUM_MICROBATCHES, seq_length=SEQ_LEN,
                                    micro_batch_size=MICRO_BATCH)
            updated, _, _ = optimizer.step()
            assert updated
            reported += [{name: value.tolist() for name, value in log.items()} for log in logs]
        mopd.close()

        without_tokens = MopdForwardStep(lambda it: (None, *megatron_lm_get_batch(it)[1:]), args=args,
                                         vocab_size=arch.vocab_size)
        try:
            without_tokens(iter(batches), ddp)
            error = None
        except ValueError as caught:
            error = str(caught)
        finally:
            without_tokens.close()
        if parallel_state.get_tensor_model_parallel_rank() != 0:
            return None
        return {"reported": reported, "expected": expected, "error": error}
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def teachers_yaml(demo_teacher_url, tmp_path_factory) -> str:
    return str(teachers_file(tmp_path_factory.mktemp("mopd") / "teachers.yaml", demo_teacher_url))


@pytest.fixture(scope="module")
def tp1(teachers_yaml) -> dict:
    (result,) = run_on_ranks(distill, 1, args=(1, teachers_yaml), timeout_s=600)
    return result


def expected_scored_rows() -> list[list[list[int]]]:
    """Per micro-batch, what the teacher must score: each row's tokens up to its last trained position n,
    then labels[n] (the row's first n + 2 tokens)."""
    rows = []
    for batch in megatron_lm_batches():
        full = torch.cat([batch["tokens"], batch["labels"][:, -1:]], dim=1)
        last = [int(torch.nonzero(mask).max()) for mask in batch["loss_mask"]]
        rows.append([full[b, :n + 2].tolist() for b, n in enumerate(last)])
    return rows


def test_the_teacher_scores_each_row_up_to_its_last_trained_position(tp1) -> None:
    expected = expected_scored_rows()
    assert min(len(row) for rows in expected for row in rows) < SEQ_LEN + 1  # a padded row is cut short
    assert max(len(row) for rows in expected for row in rows) == SEQ_LEN + 1  # a full row keeps its last label
    for i, record in enumerate(tp1["expected"]):
        assert record["scored"] == [expected[i % NUM_MICROBATCHES]] * 2  # both teachers, the same rows


def test_the_schedule_reports_the_objective_of_each_micro_batch(tp1) -> None:
    assert len(tp1["reported"]) == len(tp1["expected"]) == 2 * NUM_MICROBATCHES
    for i, (reported, expected) in enumerate(zip(tp1["reported"], tp1["expected"])):
        trained = megatron_lm_batches()[i % NUM_MICROBATCHES]["loss_mask"].sum()
        assert expected["loss"][1] == trained == expected["tokens_returned"]  # labels -100 outside the mask
        assert expected["loss_returned"] == pytest.approx(expected["loss"][0], rel=1e-6)
        assert set(reported) == {"loss", "divergence/reference", "divergence/advantage", "sft/nll"}
        for name, value in reported.items():
            assert value == pytest.approx(expected[name], rel=1e-6), (i, name)


def test_an_update_moves_the_student_toward_the_teacher(tp1) -> None:
    """The gradients reach the student through the schedule: after one update on the same batch, the
    sampled KL(S||T) that the MOPD teacher logs falls. (The MOPD part of the loss is a surrogate whose
    value itself says nothing.)"""
    first, second = tp1["reported"][:NUM_MICROBATCHES], tp1["reported"][NUM_MICROBATCHES:]
    kl = [sum(log["divergence/advantage"][0] for log in logs) / sum(log["divergence/advantage"][1] for log in logs)
          for logs in (first, second)]
    assert kl[1] < kl[0] - 0.1, kl


def test_a_last_stage_without_tokens_says_how_to_fix_get_batch(tp1) -> None:
    assert re.search(r"get_batch returned no tokens on the last pipeline stage.*examples/megatron_lm/"
                     r"pretrain_gpt_mopd.py", tp1["error"])


def test_tp2_reports_the_tp1_numbers(tp1, teachers_yaml) -> None:
    per_rank = run_on_ranks(distill, 2, args=(2, teachers_yaml), timeout_s=600)
    tp2 = next(result for result in per_rank if result is not None)
    assert len(tp2["reported"]) == len(tp1["reported"])
    for i, (two, one) in enumerate(zip(tp2["reported"], tp1["reported"])):
        assert set(two) == set(one)
        for name in one:
            assert two[name] == pytest.approx(one[name], rel=1e-5), (i, name)


# ------------------------------------------------------------------------------------- the example


def test_the_example_compiles() -> None:
    py_compile.compile(str(EXAMPLE), doraise=True)


def test_the_example_hands_the_mopd_pieces_to_pretrain() -> None:
    tree = ast.parse(EXAMPLE.read_text())
    (call,) = [node for node in ast.walk(tree)
               if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "pretrain"]
    keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
    assert keywords["extra_args_provider"] == "add_mopd_args"
    assert ast.unparse(call.args[3]) == "forward_step"
    assert re.search(r"^forward_step = MopdForwardStep\(get_batch\)$", EXAMPLE.read_text(), re.MULTILINE)


def test_the_examples_instructions_use_only_real_mopd_flags() -> None:
    docstring = ast.get_docstring(ast.parse(EXAMPLE.read_text()))
    assert "PYTHONPATH=" in docstring and "torchrun" in docstring and "--calculate-per-token-loss" in docstring
    known = set(add_mopd_args(argparse.ArgumentParser())._option_string_actions)
    named = set(re.findall(r"--mopd-[a-z-]+[a-z]", docstring))
    assert named and named <= known, named - known
