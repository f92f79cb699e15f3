"""The training run: set up Megatron-Core, the student, data and teachers; loop over the steps; save.

    report = train(load_config("run.yaml", overrides))   # every rank of a torchrun job calls it

What goes into ``output_dir``: ``config.yaml`` (resolved), ``metrics.jsonl`` (``trainer.metrics``),
``checkpoints/`` (``trainer.checkpoint``; ``checkpoint.resume=auto`` continues from the latest),
``hf/`` (the trained student as a Hugging Face directory), ``report.json`` and ``curves.png``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megatron_mopd.trainer.config import ConfigError, MopdConfig, as_dict, save_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """This rank's place in the run."""

    dp_rank: int
    dp_size: int
    reporting: bool  # last pipeline stage, TP rank 0, CP rank 0, DP rank 0: writes metrics
    fetching: bool  # last pipeline stage, TP/CP rank 0: fetches remote teacher scores
    device_type: str


def train(config: MopdConfig, *, say: Optional[Callable[[str], None]] = None) -> Optional[dict[str, Any]]:
    """Run ``config`` on this rank (collective over the job); returns the report on the reporting rank.

    Raises:
        ConfigError: the configuration does not fit the job (world size, model sizes, data).
        NonFiniteLossError, TeacherError, ...: training failed; the last checkpoint stays valid.
    """
    from megatron_mopd.platform import destroy_parallel, initialize_parallel

    parallel = config.parallel
    try:
        platform = initialize_parallel(parallel.tp, parallel.pp, parallel.cp, device=parallel.device, seed=config.seed,
                                       mindspeed_args=_megatron_lm_args(config))
    except ValueError as error:
        raise ConfigError(f"parallel: {error}") from None
    try:
        return _train(config, platform.device_type, say or print)
    finally:
        destroy_parallel()


def _megatron_lm_args(config: MopdConfig) -> dict[str, Any]:
    """The run's settings under Megatron-LM's argument names, which MindSpeed reads on NPU
    (``initialize_parallel`` adds the parallel sizes): as ``_build_trainee`` builds the student, with
    bf16 parameters when ``train.precision`` is bf16 and Megatron's distributed optimizer."""
    dtype = torch.bfloat16 if config.train.precision == "bf16" else torch.float32
    return {
        "sequence_parallel": config.parallel.sequence_parallel,
        "bf16": dtype == torch.bfloat16,
        "fp16": False,
        "params_dtype": dtype,
        "seq_length": config.data.seq_length,
        "micro_batch_size": config.train.micro_batch_size,
        "global_batch_size": config.train.global_batch_size,
        "use_distributed_optimizer": True,
    }


def _layout(device_type: str) -> Layout:
    from megatron.core import parallel_state as ps

    last = ps.is_pipeline_last_stage()
    fetching = last and ps.get_tensor_and_context_parallel_rank() == 0
    return Layout(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                  fetching and ps.get_data_parallel_rank() == 0, fetching, device_type)


def _train(config: MopdConfig, device_type: str, say: Callable[[str], None]) -> Optional[dict[str, Any]]:
    from megatron_mopd.crosstok import CanonicalVocabulary
    from megatron_mopd.crosstok.local_tokenizer import load_local_tokenizer
    from megatron_mopd.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from megatron_mopd.trainer.cross_tokenizer import CrossTokenizerSide
    from megatron_mopd.trainer.data import GlobalBatchSampler, rank_slice
    from megatron_mopd.trainer.metrics import MetricsLogger, plot_curves, write_report
    from megatron_mopd.trainer.rollout import StepSources
    from megatron_mopd.trainer.step import StepTeacher, evaluate, run_step
    from megatron_mopd.trainer.teachers import open_teachers

    layout = _layout(device_type)
    report_say = say if layout.reporting else (lambda _line: None)
    if device_type == "cpu":
        _share_cpu_cores(config)
    output_dir = Path(config.output_dir)
    tokenizer = load_local_tokenizer(config.model.tokenizer or config.model.path,
                                     "model.tokenizer" if config.model.tokenizer else "model.path")
    arch = _architecture(config, tokenizer)
    _check_layout(config, arch, layout)
    dataset = _Dataset(config.data.path, "data.path", config, tokenizer, completions=config.rollout.lmbda < 1)
    routes_of = _router(config, dataset)
    held_out = (_Dataset(config.eval.path, "eval.path", config, tokenizer, completions=False) if config.eval.path
                else None)
    held_out_routes = _router(config, held_out) if held_out else None
    if held_out is not None and len(held_out.samples) < layout.dp_size:
        raise ConfigError(f"eval.path: {len(held_out.samples)} held-out prompts for {layout.dp_size} data-parallel "
                          f"ranks; give at least one per rank")
    sampler = GlobalBatchSampler(len(dataset.samples), config.train.global_batch_size, seed=config.seed,
                                 shuffle=config.data.shuffle)
    cross_sides = {t.name: CrossTokenizerSide(t, tokenizer, max_teacher_tokens=4 * config.data.seq_length)
                   for t in config.teachers if t.tokenizer is not None}
    _check_teacher_vocabularies(config, tokenizer)
    trainee = _build_trainee(config, arch, tokenizer, layout, report_say)
    samples_student = config.rollout.lmbda > 0 or held_out is not None
    vocabulary = CanonicalVocabulary.of(tokenizer) if samples_student or config.rollout.seq_kd else None

    start_step = 0
    resume = _resume_path(config, output_dir, latest_checkpoint)
    if resume is not None:
        start_step, state = load_checkpoint(resume, trainee.model, trainee.optimizer, trainee.scheduler)
        sampler.load_state_dict(state["data"])
        report_say(f"resumed from {resume} at step {start_step}")
    if dist.get_rank() == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
    dist.barrier()

    def checkpoint(step: int) -> None:
        path = save_checkpoint(output_dir, step, trainee.model, trainee.optimizer, trainee.scheduler,
                               {"data": sampler.state_dict(), "config": as_dict(config)},
                               keep_last=config.checkpoint.keep_last)
        report_say(f"saved checkpoint {path} (step {step})")

    logger = None
    began = time.perf_counter()
    try:
        with contextlib.ExitStack() as engine_scope, open_teachers(
                config.teachers, fetching=layout.fetching, log_dir=output_dir / "logs",
                colocated=lambda t: _colocated_teacher(t, config, arch, trainee), say=report_say) as clients:
            engine = _rollout_engine(config, arch, trainee) if samples_student else None
            if isinstance(engine, contextlib.AbstractContextManager):
                engine_scope.enter_context(engine)  # stops the servers it started, after the teachers'
            teachers = [StepTeacher(t, clients[t.name], cross_sides.get(t.name)) for t in config.teachers]
            sources = StepSources(config, tokenizer, vocabulary, engine, clients,
                                  {name: side.tokenizer for name, side in cross_sides.items()}, layout.fetching)
            report_say(_banner(config, arch, layout, start_step))
            if layout.reporting:
                logger = MetricsLogger(
                    output_dir, total_steps=config.train.steps, start_step=start_step,
                    interval=config.logging.interval, progress=config.logging.progress,
                    tensorboard=config.logging.tensorboard, wandb_project=config.logging.wandb_project,
                    config=as_dict(config))

            def held_out_evaluation(step: int) -> None:
                indices = list(range(layout.dp_rank, len(held_out.samples), layout.dp_size))
                evaluation = evaluate(step, trainee, [held_out.example(i) for i in indices], teachers,
                                      held_out_routes(indices), sources.held_out(),
                                      validate_inputs=config.loss.validate_inputs)
                if logger is not None:
                    logger.log_eval(evaluation, config.eval.examples)

            for step in range(start_step, config.train.steps):
                if held_out is not None and (step == start_step or config.eval.interval
                                             and step % config.eval.interval == 0):
                    held_out_evaluation(step)
                indices = rank_slice(next(sampler), layout.dp_rank, layout.dp_size)  # the cursor moves on
                examples = [dataset.example(i) for i in indices]
                routes = routes_of(indices)
                result = run_step(step, trainee, examples, teachers, routes, sft_alpha=config.loss.sft_alpha,
                                  source=sources.for_step(step, routes),
                                  validate_inputs=config.loss.validate_inputs)
                if logger is not None:
                    logger.log(result)
                if config.checkpoint.interval and (step + 1) % config.checkpoint.interval == 0 \
                        and step + 1 < config.train.steps:
                    checkpoint(step + 1)
            if held_out is not None and start_step < config.train.steps:
                held_out_evaluation(config.train.steps)
        if config.checkpoint.save_at_end and start_step < config.train.steps:
            checkpoint(config.train.steps)
        if config.checkpoint.export_hf:
            _export(trainee, arch, tokenizer, output_dir / "hf", report_say)
    finally:
        if logger is not None:
            logger.close()
    if logger is None:
        return None
    report = write_report(output_dir, logger.records, {
        "output_dir": str(output_dir), "seconds": time.perf_counter() - began, "resumed_from_step": start_step,
        "layout": {"tp": config.parallel.tp, "pp": config.parallel.pp, "cp": config.parallel.cp,
                   "dp": layout.dp_size},
        "rollouts": {"on_policy_steps": sum(bool(r.get("on_policy")) for r in logger.records),
                     "off_policy_steps": sum(not r.get("on_policy") for r in logger.records),
                     "teacher_generated_steps": sum(r.get("completions") == "teacher" for r in logger.records)},
    }, logger.evals)
    plot = plot_curves(output_dir, logger.records, logger.evals) if config.logging.plot else None
    say(_verdict(report, output_dir, plot))
    return report


def _share_cpu_cores(config: MopdConfig) -> None:
    """Unless ``OMP_NUM_THREADS`` is set, split the node's cores between its ranks and the teacher servers
    the trainer starts (they inherit the setting): tiny CPU matrices gain nothing from threads that
    fight over the same cores, and the demo runs several times faster this way."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    servers = sum(t.placement == "remote" and not t.urls for t in config.teachers)
    servers += config.rollout.engine == "server" and not config.rollout.urls
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) + servers
    threads = max(1, (os.cpu_count() or 1) // processes)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def _architecture(config: MopdConfig, tokenizer) -> Any:
    from megatron_mopd.models import GPTArchitecture

    try:
        arch = GPTArchitecture.from_hf_config(
            config.model.path, make_vocab_size_divisible_by=config.model.make_vocab_size_divisible_by)
    except (ValueError, OSError) as error:
        raise ConfigError(f"model.path={config.model.path}: {error}") from None
    if len(tokenizer) > arch.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {arch.vocab_size}: "
            f"model.tokenizer must be the student's own tokenizer"
        )
    return arch


def _check_layout(config: MopdConfig, arch, layout: Layout) -> None:
    """Errors up front for sizes that do not fit the job or the model."""
    from megatron_mopd.models import transformer_engine_usable

    tp, pp, cp = config.parallel.tp, config.parallel.pp, config.parallel.cp
    train = config.train
    checks = [
        (arch.num_attention_heads % tp == 0,
         f"parallel.tp={tp} must divide the model's {arch.num_attention_heads} attention heads"),
        (arch.num_query_groups % tp == 0,
         f"parallel.tp={tp} must divide the model's {arch.num_query_groups} key/value heads"),
        (arch.num_layers % pp == 0, f"parallel.pp={pp} must divide the model's {arch.num_layers} layers"),
        (cp == 1 or transformer_engine_usable(),
         "parallel.cp > 1 needs Transformer Engine's context-parallel attention (CUDA; pip install "
         "'megatron_mopd[cuda]'): Megatron's local attention refuses it; use parallel.cp=1"),
        (config.data.seq_length % (2 * cp) == 0,
         f"data.seq_length={config.data.seq_length} must be divisible by 2 * parallel.cp = {2 * cp}"),
        (config.data.seq_length <= arch.max_position_embeddings,
         f"data.seq_length={config.data.seq_length} exceeds the model's {arch.max_position_embeddings} positions"),
        (train.global_batch_size % (train.micro_batch_size * layout.dp_size) == 0,
         f"train.global_batch_size={train.global_batch_size} must be a multiple of train.micro_batch_size "
         f"({train.micro_batch_size}) x data-parallel size ({layout.dp_size})"),
        (train.precision == "fp32" or layout.device_type != "cpu",
         "train.precision=bf16 needs CUDA or NPU; use fp32 on the CPU"),
        (not config.parallel.sequence_parallel or layout.device_type != "cpu",
         "parallel.sequence_parallel needs Transformer Engine or Apex (CUDA); turn it off on the CPU"),
    ]
    for teacher in config.teachers:
        checks.append((teacher.placement == "remote" or cp == 1,
                       f"teacher {teacher.name!r}: a colocated teacher does not support parallel.cp > 1; serve it "
                       f"(placement: remote, model: DIR)"))
        checks.append((teacher.tokenizer is None or cp == 1,
                       f"teacher {teacher.name!r}: a teacher with another tokenizer does not support "
                       f"parallel.cp > 1 yet"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _check_teacher_vocabularies(config: MopdConfig, tokenizer) -> None:
    """A teacher without a tokenizer of its own must index the student's vocabulary: when its model
    directory has a tokenizer, the two must be the same vocabulary (same fingerprint)."""
    from megatron_mopd.crosstok import vocabulary_fingerprint
    from megatron_mopd.crosstok.local_tokenizer import load_local_tokenizer

    student = None
    for teacher in config.teachers:
        if teacher.tokenizer is not None or teacher.model is None:
            continue
        try:
            own = load_local_tokenizer(teacher.model, "teachers.N.model")
        except (OSError, ValueError):
            continue  # no tokenizer in the directory: nothing to compare
        student = student or vocabulary_fingerprint(tokenizer)
        if vocabulary_fingerprint(own) != student:
            raise ConfigError(
                f"teacher {teacher.name!r}: {teacher.model} has another tokenizer than the student; "
                + ("a colocated teacher must share the student's vocabulary" if teacher.placement == "colocated"
                   else "set teachers.N.tokenizer and a projection (mopd build-projection) and loss ctkd or gold")
            )


class _Dataset:
    """The samples and their tokenizations (each tokenized once, when first used).

    ``completions``: every sample must have one (some steps train on dataset completions)."""

    def __init__(self, path: str, key: str, config: MopdConfig, tokenizer, *, completions: bool) -> None:
        from megatron_mopd.trainer.data import load_samples

        data = config.data
        try:
            self.samples = load_samples(path, prompt_key=data.prompt_key, completion_key=data.completion_key,
                                        messages_key=data.messages_key, domain_key=data.domain_key)
        except (ValueError, OSError, ImportError) as error:
            raise ConfigError(f"{key}: {error}") from None
        self.key = key
        if completions and not config.rollout.seq_kd and any(s.completion is None for s in self.samples):
            first = next(s.index for s in self.samples if s.completion is None)
            raise ConfigError(
                f"{key}: sample {first} has no completion; prompt-only data needs every step on-policy "
                f"(rollout.lmbda=1) or teacher-generated (rollout.seq_kd=true)"
            )
        self.tokenizer, self.seq_length = tokenizer, data.seq_length
        self._cache: dict[int, Any] = {}

    def example(self, index: int):
        from megatron_mopd.trainer.data import Example, render, tokenize

        if index not in self._cache:
            rendered = render(self.samples[index], self.tokenizer)
            self._cache[index] = Example(self.samples[index], rendered,
                                         tokenize(rendered, self.tokenizer, self.seq_length))
        return self._cache[index]


def _router(config: MopdConfig, dataset: _Dataset) -> Callable[[list[int]], dict[str, torch.Tensor]]:
    """``routes(indices)``: bool ``[len(indices)]`` per teacher, the samples it scores."""
    if config.loss.routing == "weights":
        return lambda indices: {t.name: torch.ones(len(indices), dtype=torch.bool) for t in config.teachers}
    teacher_of = {domain: t.name for t in config.teachers for domain in t.domains}
    for sample in dataset.samples:
        if sample.domain not in teacher_of:
            raise ConfigError(
                f"{dataset.key}: sample {sample.index} has domain {sample.domain!r}, which no teacher lists "
                f"(teachers' domains: {sorted(teacher_of)}); add it to a teacher's domains"
            )

    def routes(indices: list[int]) -> dict[str, torch.Tensor]:
        owners = [teacher_of[dataset.samples[i].domain] for i in indices]
        return {t.name: torch.tensor([o == t.name for o in owners], dtype=torch.bool) for t in config.teachers}

    return routes


def _build_trainee(config: MopdConfig, arch, tokenizer, layout: Layout, say: Callable[[str], None]):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_mopd.models import load_hf_weights
    from megatron_mopd.trainer.step import Trainee

    train, parallel = config.train, config.parallel
    on_cpu = layout.device_type == "cpu"
    dtype = torch.bfloat16 if train.precision == "bf16" else torch.float32
    model = arch.build(parallel.tp, parallel.pp, params_dtype=dtype, context_parallel_size=parallel.cp,
                       sequence_parallel=parallel.sequence_parallel)
    if config.model.load_weights:
        try:
            load_hf_weights(model, config.model.path, arch)
        except ValueError as error:
            raise ConfigError(f"model.path={config.model.path}: {error}") from None
    if not on_cpu:
        model.to(torch.device(layout.device_type, torch.accelerator.current_device_index()))
    model_config = model.config
    model_config.calculate_per_token_loss = True
    distributed_optimizer = not on_cpu
    ddp = DistributedDataParallel(model_config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer), model)
    clip_grad = 0.0 if on_cpu else train.clip_grad
    if on_cpu and train.clip_grad > 0:
        say(f"train.clip_grad={train.clip_grad} is off on the CPU (Megatron's clipping is CUDA-only)")
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_eps=train.adam_eps, clip_grad=clip_grad,
        bf16=dtype == torch.bfloat16, params_dtype=dtype, use_distributed_optimizer=distributed_optimizer,
    ), [ddp])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if train.lr_warmup_steps else train.lr, max_lr=train.lr, min_lr=train.min_lr,
        lr_warmup_steps=train.lr_warmup_steps, lr_decay_steps=train.steps, lr_decay_style=train.lr_decay_style,
        start_wd=train.weight_decay, end_wd=train.weight_decay, wd_incr_steps=train.steps, wd_incr_style="constant",
    )
    model_config.grad_scale_func = optimizer.scale_loss
    model_config.finalize_model_grads_func = finalize_model_grads
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Trainee([ddp], optimizer, scheduler, get_forward_backward_func(), config.data.seq_length,
                   train.micro_batch_size, arch.vocab_size, pad_id if pad_id is not None else 0,
                   fused_output_layer=config.loss.fused_output_layer)


def _colocated_teacher(teacher, config: MopdConfig, arch, trainee):
    """A colocated teacher: its Hugging Face directory loaded into a Megatron-Core model with the student's
    layout; its vocabulary must be the student's (same ids, same padding)."""
    from megatron_mopd.models import GPTArchitecture, load_hf_weights
    from megatron_mopd.teachers import ColocatedTeacher

    where = f"teacher {teacher.name!r}"
    try:
        teacher_arch = GPTArchitecture.from_hf_config(
            teacher.model, make_vocab_size_divisible_by=config.model.make_vocab_size_divisible_by)
    except (ValueError, OSError) as error:
        raise ConfigError(f"{where}: model {teacher.model}: {error}") from None
    if teacher_arch.vocab_size != arch.vocab_size:
        raise ConfigError(
            f"{where}: a colocated teacher must have the student's vocabulary ({arch.vocab_size} ids), its model "
            f"has {teacher_arch.vocab_size}; serve a teacher with another vocabulary remotely with a projection "
            f"(placement: remote, tokenizer, projection, loss: ctkd or gold)")
    parallel = config.parallel
    if teacher_arch.num_query_groups % parallel.tp or teacher_arch.num_layers % parallel.pp:
        raise ConfigError(f"{where}: the teacher's {teacher_arch.num_query_groups} key/value heads and "
                          f"{teacher_arch.num_layers} layers must divide by parallel.tp and parallel.pp")
    dtype = torch.bfloat16 if config.train.precision == "bf16" else torch.float32
    # sequence_parallel as the student's, explicitly: on NPU, MindSpeed fills unset fields from its arguments
    model = teacher_arch.build(parallel.tp, parallel.pp, params_dtype=dtype,
                               sequence_parallel=parallel.sequence_parallel)
    try:
        load_hf_weights(model, teacher.model, teacher_arch)
    except ValueError as error:
        raise ConfigError(f"{where}: model {teacher.model}: {error}") from None
    if next(trainee.model[0].parameters()).device.type != "cpu":
        model.to(next(trainee.model[0].parameters()).device)
    return ColocatedTeacher(model, topk=teacher.topk, vocab_size=arch.vocab_size,
                            micro_batch_size=trainee.micro_batch_size, pad_token_id=trainee.pad_id)


def _rollout_engine(config: MopdConfig, arch, trainee):
    """The engine of ``rollout.engine``. ``megatron``: samples from the live student on every rank.
    ``server``: inference servers serve the student (``rollout.urls``, or, without urls, ``rollout.server``
    started by local rank 0 of each node on ``served_dir`` after a first export of the student); its
    weights are pushed whenever the optimizer stepped since the last push. Collective. The server engine
    is a context manager: leaving it stops the servers started here."""
    from megatron_mopd.crosstok.local_tokenizer import load_local_tokenizer
    from megatron_mopd.rollout import MegatronRolloutEngine
    from megatron_mopd.rollout.server_engine import (
        DiskWeightSync,
        ServerRolloutEngine,
        export_served,
        logprobs_mode_for,
    )
    from megatron_mopd.teachers.server_process import teacher_server_process, vllm_server_process
    from megatron_mopd.trainer.teachers import served_on_each_node

    rollout = config.rollout
    if rollout.engine == "megatron":
        return MegatronRolloutEngine(trainee.model[0], vocab_size=arch.vocab_size, pad_token_id=trainee.pad_id,
                                     max_sequence_length=config.data.seq_length)
    served_dir = Path(rollout.served_dir or Path(config.output_dir) / "rollout_model")
    tokenizer = load_local_tokenizer(config.model.tokenizer or config.model.path,
                                     "model.tokenizer" if config.model.tokenizer else "model.path")
    fields = {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}
    urls, all_urls, servers = list(rollout.urls), list(rollout.urls), contextlib.ExitStack()
    if not urls:
        export_served(trainee.model[0], arch, served_dir, tokenizer=tokenizer, hf_config_fields=fields)
        log_path = Path(config.output_dir) / "logs" / f"rollout-{rollout.server}-{socket.gethostname()}.log"
        mode = logprobs_mode_for(rollout.sampling()) if rollout.protocol == "vllm" else "raw_logprobs"

        def start():
            log_path.parent.mkdir(parents=True, exist_ok=True)
            if rollout.server == "vllm":
                return vllm_server_process(served_dir, "--logprobs-mode", mode, "--max-model-len",
                                           str(config.data.seq_length), log_path=log_path,
                                           startup_timeout_s=rollout.wait_for_servers_s)
            return teacher_server_process(served_dir, "--logprobs-mode", mode, log_path=log_path,
                                          startup_timeout_s=rollout.wait_for_servers_s)

        node_url, all_urls = servers.enter_context(
            served_on_each_node(start, f"rollout.server={rollout.server} on {served_dir}"))
        urls = [node_url]
    sync = DiskWeightSync(served_dir, all_urls, rollout.protocol, arch, tokenizer=tokenizer, hf_config_fields=fields,
                          timeout_s=rollout.timeout_s)
    try:
        return ServerRolloutEngine(
            trainee.model[0], urls=urls, protocol=rollout.protocol, weight_sync=sync,
            weights_version=lambda: trainee.scheduler.num_steps, vocab_size=arch.vocab_size,
            max_sequence_length=config.data.seq_length, timeout_s=rollout.timeout_s, retries=rollout.retries,
            wait_for_servers_s=rollout.wait_for_servers_s, servers=servers)
    except BaseException:
        servers.close()
        raise


def _resume_path(config: MopdConfig, output_dir: Path, latest_checkpoint) -> Optional[Path]:
    resume = config.checkpoint.resume
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"checkpoint.resume={resume}: no such checkpoint (use auto, none or a checkpoint path)")
    return path


def _export(trainee, arch, tokenizer, out_dir: Path, say: Callable[[str], None]) -> None:
    import shutil

    from megatron_mopd.models import export_hf_weights

    if dist.get_rank() == 0 and out_dir.exists():
        shutil.rmtree(out_dir)  # a previous run's export; the checkpoints hold the training state
    dist.barrier()
    say(f"exporting the student to {out_dir}")
    export_hf_weights(trainee.model[0], arch, out_dir, tokenizer=tokenizer)


def _banner(config: MopdConfig, arch, layout: Layout, start_step: int) -> str:
    teachers = ", ".join(f"{t.name} ({t.placement} {t.loss}{'' if t.loss == 'jsd' else f', K={t.topk}'})"
                         for t in config.teachers) or "none (fine-tuning)"
    return (f"mopd train: student {arch.hf_model_type} {arch.num_layers} layers x {arch.hidden_size} on "
            f"{layout.device_type}, TP={config.parallel.tp} PP={config.parallel.pp} CP={config.parallel.cp} "
            f"DP={layout.dp_size}; teachers: {teachers}; steps {start_step}..{config.train.steps} of "
            f"{config.train.global_batch_size} sequences")


def _verdict(report: dict[str, Any], output_dir: Path, plot: Optional[Path]) -> str:
    lines = [f"done: {report['steps']} steps in {report['seconds']:.0f} s; wrote {output_dir}/"
             f"{{config.yaml, metrics.jsonl, report.json{', curves.png' if plot else ''}}}"]
    where = " (held-out prompts, the student's samples)" if "eval" in report else ""
    for name, values in report["teachers"].items():
        lines.append(f"  divergence to {name}{where}: {values['divergence_start']:.4f} -> "
                     f"{values['divergence_end']:.4f}")
    for before, after in zip(report.get("eval", {}).get("examples_before", []),
                             report.get("eval", {}).get("examples_after", [])):
        domain = f"[{before['domain']}] " if before["domain"] else ""
        lines.append(f"  {domain}{before['prompt']!r}: before {before['completion']!r}, after {after['completion']!r}")
    return "\n".join(lines)
