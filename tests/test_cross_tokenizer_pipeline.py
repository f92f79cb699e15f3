"""Specification: the whole cross-tokenizer path on two really different trained tokenizers.

Student: byte-level BPE; teacher: SentencePiece-style BPE with byte fallback (and the reverse roles).
Each sample is rendered with a different chat template on each side (ChatML for the student,
``[INST]`` for the teacher); the completion — English, numbers, code with whitespace runs, CJK — is
aligned by its text, the projection is built from the two tokenizers, and P-KL and GOLD on the
student's logits (TP = 1 and 2) equal the dense reference, with no gradient outside the completion.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

import cross_tokenizer_reference as reference
from dense_reference import rel_err
from megatron_mopd.crosstok import VocabProjection, align_batch, align_texts
from megatron_mopd.demo.tokenizers import byte_level_bpe, sentencepiece_bpe
from megatron_mopd.losses import gold_loss, projected_kl
from megatron_mopd.testing import run_on_ranks
from test_cross_tokenizer_losses import dense_projection

SAMPLES = [
    ("Add the numbers.", "12345 + 678 = 13023, so the sum is 13023."),
    ("Write code.", "def f(x):\n    return   x * 2\n\tpass"),
    ("Greet me in Chinese.", "你好吗？ I am fine, 谢谢."),
]
PADDED_STUDENT_VOCAB, K, TOLERANCE = 2048, 16, 1e-5
TOKENIZERS = {"byte_level": byte_level_bpe, "sentencepiece": sentencepiece_bpe}


def render(side: str, prompt: str, completion: str) -> tuple[str, tuple[int, int]]:
    """The side's own chat template; returns the text and the completion's character range."""
    head = (
        f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        if side == "student"
        else f"[INST] {prompt} [/INST]\n"
    )
    return head + completion, (len(head), len(head) + len(completion))


@functools.lru_cache(maxsize=None)
def pipeline(student_name: str, teacher_name: str):
    student_tok, teacher_tok = TOKENIZERS[student_name](), TOKENIZERS[teacher_name]()
    alignments, student_ids, teacher_ids = [], [], []
    for prompt, completion in SAMPLES:
        student_text, student_region = render("student", prompt, completion)
        teacher_text, teacher_region = render("teacher", prompt, completion)
        alignment, s_ids, t_ids = align_texts(
            student_text, teacher_text, student_tok, teacher_tok, [student_region], [teacher_region]
        )
        alignments.append(alignment)
        student_ids.append(s_ids)
        teacher_ids.append(t_ids)
    student_len = max(map(len, student_ids))
    teacher_len = max(map(len, teacher_ids))
    batch = align_batch(alignments, student_len, teacher_len)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(len(SAMPLES), student_len, PADDED_STUDENT_VOCAB, generator=gen) * 2
    teacher_logits = torch.randn(len(SAMPLES), teacher_len - 1, len(teacher_tok), generator=gen)
    teacher_logp = torch.log_softmax(teacher_logits * 3, -1)
    logprobs, ids = teacher_logp.topk(K, dim=-1)
    projection = VocabProjection.build(student_tok, teacher_tok)
    return dict(
        batch=batch, logits=logits, logprobs=logprobs, ids=ids, projection=projection,
        student_vocab=len(student_tok),
    )


def losses_on_shard(data: dict, rank: int, world_size: int, group) -> list[tuple[torch.Tensor, torch.Tensor]]:
    width = PADDED_STUDENT_VOCAB // world_size
    batch = data["batch"]
    out = []
    for loss_fn in (projected_kl, gold_loss):
        shard = data["logits"][..., rank * width : (rank + 1) * width].clone().requires_grad_(True)
        loss = loss_fn(
            shard, batch.student_chunk_ids, data["logprobs"], data["ids"], batch.teacher_chunk_ids,
            data["projection"], num_chunks=batch.num_chunks, vocab_size=data["student_vocab"], tp_group=group,
        )
        loss.mean().backward()
        out.append((loss.detach(), shard.grad))
    return out


def _rank_worker(data: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return losses_on_shard(data, dist.get_rank(), dist.get_world_size(), dist.group.WORLD)


def reference_losses(data: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batch, projection, vocab = data["batch"], data["projection"], data["student_vocab"]
    out = []
    for kind in ("pkl", "gold"):
        logits = data["logits"].double().requires_grad_(True)
        if kind == "pkl":
            allowed = set(torch.nonzero(projection.teacher_reachable()).flatten().tolist())
            teacher = reference.chunk_teacher(data["logprobs"], data["ids"], batch.teacher_chunk_ids, batch.num_chunks,
                                              1.0, "tail", K, allowed)
            loss = reference.projected_kl(logits, batch.student_chunk_ids, dense_projection(projection), teacher, 0.0,
                                          1.0, "tail", vocab)
        else:
            teacher = reference.chunk_teacher(data["logprobs"], data["ids"], batch.teacher_chunk_ids, batch.num_chunks,
                                              1.0, "tail", K)
            student_ids, teacher_ids = projection.common_pairs(0.6)
            pairs = dict(zip(teacher_ids.tolist(), student_ids.tolist()))
            matched = len(pairs) / projection.teacher_vocab_size
            loss = reference.gold(logits, batch.student_chunk_ids, pairs, teacher, 0.5, 1.0, "tail", vocab, matched,
                                  1 - matched)
        loss.mean().backward()
        out.append((loss.detach(), logits.grad))
    return out


@pytest.mark.parametrize("student_name,teacher_name",
                         [("byte_level", "sentencepiece"), ("sentencepiece", "byte_level")])
@pytest.mark.parametrize("tp", [1, 2])
def test_aligned_losses_match_the_dense_reference(student_name: str, teacher_name: str, tp: int) -> None:
    data = pipeline(student_name, teacher_name)
    assert data["batch"].num_chunks > 20
    if tp == 1:
        results = losses_on_shard(data, 0, 1, None)
    else:
        per_rank = run_on_ranks(_rank_worker, tp, args=(data,))
        results = [(per_rank[0][i][0], torch.cat([r[i][1] for r in per_rank], -1)) for i in range(2)]
    for (loss, grad), (expected_loss, expected_grad) in zip(results, reference_losses(data)):
        assert rel_err(loss, expected_loss) <= TOLERANCE
        assert rel_err(grad, expected_grad) <= TOLERANCE
        outside = data["batch"].student_chunk_ids < 0
        assert torch.all(grad[outside] == 0), "positions outside the completion get no gradient"
