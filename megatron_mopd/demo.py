"""CPU demo: distill a remote teacher into a Megatron-Core student, end to end, on the embedded default.

    mopd demo                                            # one process, TP=1, CPU, ~1 minute
    torchrun --nproc-per-node 2 -m megatron_mopd.demo --tp 2

Every part is the real one:

* tokenizer: a byte-level BPE trained on the spot (``testing.tokenizers``), shared by both models;
* teacher: a small Hugging Face Llama-architecture model (``testing.models``) served by the reference
  teacher server (``mopd serve-teacher``) in a subprocess — or any vLLM/SGLang server (``--teacher-url``);
* student: a Megatron-Core GPTModel (``testing.gpt``) trained with Megatron's pipeline schedule,
  DistributedDataParallel and optimizer, on CPU with gloo (CPU mode);
* each step the last pipeline stage's TP rank 0 submits the step's sequences to the teacher
  (``RemoteTeacher`` top-K prompt logprobs) before the student's forward passes and waits only inside
  the loss (``placement.submit_teacher_scores``); the loss is the vocab-parallel top-K generalized JSD
  (``losses.topk_generalized_jsd``) reduced per token over the step (``calculate_per_token_loss``).

The data is the embedded multilingual sample (English, numbers, code, CJK) in overlapping windows of
the sequence length, off-policy (the student's rollouts come with the trainer). The divergence to the teacher falls
step by step; the per-step table is printed and written as JSON (``--out``), and to TensorBoard /
Weights & Biases when they are installed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

if TYPE_CHECKING:
    import torch

    from megatron_mopd.teachers import TeacherLogprobs

# The heavy imports (torch, Megatron, tokenizers) happen in ``run``: ``mopd --help`` stays fast.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step and data-parallel rank")
    parser.add_argument("--seq-length", type=int, default=64, help="student sequence length (tokens)")
    parser.add_argument("--topk", type=int, default=16, help="teacher top-K log-probabilities per position")
    parser.add_argument("--beta", type=float, default=0.5, help="generalized JSD beta (0 forward KL, 1 reverse KL)")
    parser.add_argument("--tail", choices=["tail", "renorm"], default="tail")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--teacher-url", action="append", help="use this vLLM/SGLang server (repeatable)")
    parser.add_argument("--protocol", choices=["vllm", "sglang"], default="vllm")
    parser.add_argument("--out", type=Path, default=Path("runs/demo/metrics.json"))
    parser.add_argument("--seed", type=int, default=1234)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from megatron_mopd.parallel import destroy_parallel, initialize_parallel
    from megatron_mopd.testing.tokenizers import byte_level_bpe

    tokenizer = byte_level_bpe()
    initialize_parallel(args.tp, args.pp, seed=args.seed)
    try:
        with _teacher_urls(args) as urls:
            return _train(args, tokenizer, urls)
    finally:
        destroy_parallel()


@contextlib.contextmanager
def _teacher_urls(args: argparse.Namespace) -> Iterator[list[str]]:
    """The teacher servers: the given URLs, or the reference server started by global rank 0."""
    import torch.distributed as dist

    from megatron_mopd.testing.models import tiny_causal_lm_dir
    from megatron_mopd.testing.server_process import teacher_server_process

    if args.teacher_url:
        yield args.teacher_url
        return
    model_dir = tiny_causal_lm_dir()
    flags = ("--max-logprobs", str(args.topk))
    with teacher_server_process(model_dir, *flags) if dist.get_rank() == 0 else contextlib.nullcontext() as server:
        urls = [server.url if server else None]
        dist.broadcast_object_list(urls, src=0)
        yield urls
        dist.barrier()  # every rank is done with the teacher before rank 0 stops it


def _train(args: argparse.Namespace, tokenizer, urls: list[str]) -> int:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_mopd.teachers import RemoteTeacher
    from megatron_mopd.teachers.placement import submit_teacher_scores
    from megatron_mopd.testing.gpt import TinyGPT

    args.vocab_size = len(tokenizer)
    spec = TinyGPT(vocab_size=args.vocab_size, max_sequence_length=args.seq_length)
    model = spec.build(args.tp, args.pp)
    spec.load_layout_independent_weights(model, args.tp, args.pp)  # the same student at every layout
    config = model.config
    config.calculate_per_token_loss = True
    ddp_model = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=0.0, clip_grad=0.0), [ddp_model]
    )
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    forward_backward = get_forward_backward_func()

    fetching = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_and_context_parallel_rank() == 0
    teacher = RemoteTeacher(urls, args.protocol, topk=args.topk, wait_for_servers_s=120) if fetching else None
    sequences = _sequences(tokenizer, args.seq_length)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    per_step = args.micro_batch_size * args.micro_batches
    reporting = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    logger = _MetricsLogger(args.out) if reporting and dp_rank == 0 else None
    if logger:
        print(f"demo: student GPTModel TP={args.tp} PP={args.pp} DP={dp_size}, teacher {urls}, K={args.topk}, "
              f"beta={args.beta}, {args.steps} steps of {per_step * dp_size} sequences")
        print(f"{'step':>5}{'jsd/token':>12}{'tokens':>8}{'teacher wait ms':>17}{'step ms':>9}")
    try:
        for step in range(args.steps):
            began = time.perf_counter()
            start = (step * per_step * dp_size + dp_rank * per_step) % len(sequences)
            mine = [sequences[(start + i) % len(sequences)] for i in range(per_step)]
            pending = submit_teacher_scores(teacher, mine, seq_length=args.seq_length)  # overlaps the forward passes
            batches = _micro_batches(mine, args.micro_batch_size, args.seq_length, tokenizer.pad_token_id)
            wait = _Wait(pending)
            ddp_model.zero_grad_buffer()
            optimizer.zero_grad()
            reduced = forward_backward(
                forward_step_func=partial(_forward_step, wait, args),
                data_iterator=iter(batches),
                model=[ddp_model],
                num_microbatches=len(batches),
                seq_length=args.seq_length,
                micro_batch_size=args.micro_batch_size,
            )
            update_successful, _, _ = optimizer.step()
            if not update_successful:
                raise RuntimeError(f"step {step}: the optimizer step failed")
            if reporting:  # the step's (sum, tokens) over this rank's micro-batches, then over DP ranks
                totals = torch.stack([r["jsd"] for r in reduced]).sum(0)
                dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
                if logger:
                    logger.log(step, float(totals[0] / totals[1]), int(totals[1]), wait.waited_s,
                               time.perf_counter() - began)
    finally:
        if teacher:
            teacher.close()
        if logger:
            logger.close()
    return 0


def _sequences(tokenizer, seq_length: int) -> list[list[int]]:
    """The embedded default data: the multilingual sample's tokens cut into windows of seq_length."""
    from megatron_mopd.testing.tokenizers import MULTILINGUAL_SAMPLE

    ids = tokenizer(MULTILINGUAL_SAMPLE)["input_ids"]
    return [ids[start : start + seq_length] for start in range(0, len(ids) - seq_length + 1, seq_length // 2)]


def _micro_batches(sequences: list[list[int]], size: int, seq_length: int, pad_id: int) -> list[dict[str, Any]]:
    import torch

    batches = []
    for first in range(0, len(sequences), size):
        tokens = torch.full((size, seq_length), pad_id, dtype=torch.long)
        for row, ids in enumerate(sequences[first : first + size]):
            tokens[row, : len(ids)] = torch.tensor(ids)
        batches.append({"tokens": tokens, "rows": slice(first, first + size)})
    return batches


class _Wait:
    """The step's teacher scores, waited for once, when the first loss needs them."""

    def __init__(self, pending) -> None:
        self._pending, self._scores, self.waited_s = pending, None, 0.0

    def scores(self) -> Optional["TeacherLogprobs"]:
        if self._pending is not None:
            began = time.perf_counter()
            self._scores, self._pending = self._pending.wait(), None
            self.waited_s = time.perf_counter() - began
        return self._scores


def _forward_step(wait: _Wait, args: argparse.Namespace, data_iterator, model):
    import torch

    batch = next(data_iterator)
    seq_length = batch["tokens"].shape[1]
    position_ids = torch.arange(seq_length).expand_as(batch["tokens"])
    logits = model(batch["tokens"], position_ids, None)
    return logits, partial(_loss, wait, args, batch["rows"])


def _loss(wait: _Wait, args: argparse.Namespace, rows: slice, logits: "torch.Tensor"):
    """Per-token top-K JSD against the teacher on this micro-batch's valid rows: (sum, count, logged)."""
    import torch

    from megatron_mopd.losses import masked_sum_and_count, topk_generalized_jsd

    scores = wait.scores()
    valid = scores.valid[rows]
    loss = topk_generalized_jsd(
        logits, scores.topk_logprobs[rows], scores.topk_ids[rows], beta=args.beta, tail=args.tail,
        vocab_size=args.vocab_size,
    )
    total, count = masked_sum_and_count(loss, None, loss_mask=valid)
    return total, count.int(), {"jsd": torch.stack([total.detach().clone(), count.float()])}


class _MetricsLogger:
    """Per-step metrics: printed, kept for the JSON file, and sent to TensorBoard / W&B if installed."""

    def __init__(self, out: Path) -> None:
        self.out, self.rows = out, []
        self.tensorboard = self.wandb = None
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out.parent / "tensorboard"))
        with contextlib.suppress(ImportError):
            import wandb

            if wandb.run is not None:
                self.wandb = wandb

    def log(self, step: int, jsd: float, tokens: int, waited_s: float, step_s: float) -> None:
        self.rows.append(dict(step=step, jsd_per_token=jsd, tokens=tokens, teacher_wait_s=waited_s, step_s=step_s))
        print(f"{step:>5}{jsd:>12.4f}{tokens:>8}{waited_s * 1e3:>17.1f}{step_s * 1e3:>9.0f}")
        if self.tensorboard:
            self.tensorboard.add_scalar("distill/jsd_per_token", jsd, step)
            self.tensorboard.add_scalar("distill/teacher_wait_s", waited_s, step)
        if self.wandb:
            self.wandb.log({"jsd_per_token": jsd, "teacher_wait_s": waited_s}, step=step)

    def close(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.rows, indent=2))
        print(f"demo: jsd/token {self.rows[0]['jsd_per_token']:.4f} -> {self.rows[-1]['jsd_per_token']:.4f}; "
              f"wrote {self.out}")
        if self.tensorboard:
            self.tensorboard.close()


if __name__ == "__main__":
    raise SystemExit(main())
