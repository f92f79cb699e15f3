"""Specification: ``RemoteTeacher`` reads top-K prompt log-probabilities from vLLM and SGLang servers
(docs/design.md §5) exactly, in batched requests, through retries and load balancing, and fails loudly
(naming server, request, sequence and position) whenever a response does not match its request.

Servers are ``megatron_mopd.testing.canned_server.CannedServer`` (real HTTP on 127.0.0.1, bodies in
the real formats from a deterministic bigram model, scripted faults), the recorded-format bodies of
``tests/fixtures/``, and, at the end, the reference server subprocess serving a tiny HF model.
"""

from __future__ import annotations

import gc
import http.server
import json
import threading
import time
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from megatron_mopd.crosstok import align_offsets
from megatron_mopd.teachers import (
    RemoteTeacher,
    TeacherConfigError,
    TeacherLogprobs,
    TeacherRequestError,
    TeacherResponseError,
)
from megatron_mopd.teachers.protocols import ResponseMismatch, _gc_paused, get_protocol
from megatron_mopd.testing.canned_server import (
    BigramModel,
    CannedServer,
    sglang_generate_body,
    simulated_training_loop,
    vllm_completion_body,
)

FIXTURES = Path(__file__).parent / "fixtures"
PROTOCOLS = ["vllm", "sglang"]
NEG_INF = -np.inf
FAST = dict(backoff_s=0.01, timeout_s=10.0)

# What both recorded bodies say (tests/fixtures/README.md): rows of prompt 0 (3) then prompt 1 (2).
RECORDED_IDS = [[11, 0, 1879], [358, 1052, 3838], [0, 13, 151643], [1079, 2776, 614], [537, 1588, 2087]]
RECORDED_LOGPROBS = [
    [np.log(0.5), np.log(0.25), np.log(0.125)],
    [-0.5, -1.75, -2.25],
    [np.log(0.75), np.log(0.25), NEG_INF],  # vLLM -9999.0 / SGLang null
    [np.log(0.9), -2.75, -4.0],
    [-0.5, -1.5, -2.0],
]
RECORDED_TOKEN_LOGPROBS = [np.log(0.5), -3.5, np.log(0.25), np.log(0.9), NEG_INF]


def recorded(protocol: str) -> tuple[bytes, list[list[int]], int]:
    name = {"vllm": "vllm_completions_prompt_logprobs.json", "sglang": "sglang_generate_logprobs.json"}[protocol]
    request = json.loads((FIXTURES / "teacher_request.json").read_text())
    return (FIXTURES / name).read_bytes(), request["prompts"], request["topk"]


def expected_scores(server: CannedServer, sequences: list[list[int]], k: int) -> TeacherLogprobs:
    """What a correct client returns for ``sequences``, from the canned server's model directly (invalid
    rows: −inf top-K log-probabilities, id 0, token log-probability 0.0, as the colocated teacher's)."""
    rows = max(len(s) for s in sequences) - 1
    topk_logprobs = torch.full((len(sequences), rows, k), NEG_INF)
    topk_ids = torch.zeros((len(sequences), rows, k), dtype=torch.int64)
    token_logprobs = torch.zeros((len(sequences), rows))
    valid = torch.zeros((len(sequences), rows), dtype=torch.bool)
    for b, tokens in enumerate(sequences):
        if len(tokens) < 2:
            continue
        values, ids = server.model.topk(tokens, k)
        n = len(tokens) - 1
        topk_logprobs[b, :n], topk_ids[b, :n] = torch.from_numpy(values), torch.from_numpy(ids)
        token_logprobs[b, :n] = torch.from_numpy(server.model.logprobs(tokens)[np.arange(n), tokens[1:]])
        valid[b, :n] = True
    return TeacherLogprobs(topk_logprobs, topk_ids, token_logprobs, valid, tuple(map(tuple, sequences)))


def assert_same(actual: TeacherLogprobs, expected: TeacherLogprobs) -> None:
    assert actual.sequences == expected.sequences
    for name in ("topk_logprobs", "topk_ids", "token_logprobs", "valid"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), rtol=0, atol=0, msg=name)


def random_sequences(count: int, vocab: int, seed: int, lengths=(1, 40)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(*lengths, endpoint=True)).tolist() for _ in range(count)]


def greedy(server: CannedServer | BigramModel, start: int, length: int) -> list[int]:
    """A sequence whose every actual token is the most probable one (vLLM sends K entries, not K+1)."""
    model = server.model if isinstance(server, CannedServer) else server
    tokens = [start]
    while len(tokens) < length:
        tokens.append(int(np.argmax(model.table[tokens[-1]])))
    return tokens


# ---- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_recorded_bodies_parse_exactly(protocol):
    """Null first entries, −9999 / null → −inf, K+1 entries with the actual token, decoded_token null."""
    body, prompts, k = recorded(protocol)
    rows = get_protocol(protocol).parse(body, prompts, k)
    np.testing.assert_array_equal(rows.topk_ids, RECORDED_IDS)
    np.testing.assert_array_equal(rows.topk_logprobs, np.float32(RECORDED_LOGPROBS))
    np.testing.assert_array_equal(rows.token_logprobs, np.float32(RECORDED_TOKEN_LOGPROBS))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_recorded_bodies_through_http(protocol):
    """A replayed body becomes a [B, T-1, K] TeacherLogprobs; rows past a sequence's end are invalid."""
    body, prompts, k = recorded(protocol)
    with CannedServer() as server, RemoteTeacher(server.url, protocol, topk=k, **FAST) as teacher:
        server.replay(body)
        out = teacher.score(prompts)
    assert out.topk_logprobs.shape == (2, 3, 3) and out.sequences == tuple(map(tuple, prompts))
    assert out.valid.tolist() == [[True, True, True], [True, True, False]]
    assert out.topk_ids[0].tolist() == RECORDED_IDS[:3] and out.topk_ids[1, :2].tolist() == RECORDED_IDS[3:]
    assert torch.equal(out.topk_logprobs[1, :2], torch.tensor(RECORDED_LOGPROBS[3:], dtype=torch.float32))
    assert out.token_logprobs[1].tolist() == [np.float32(np.log(0.9)), NEG_INF, 0.0]  # valid −inf; invalid 0
    assert torch.all(out.topk_logprobs[1, 2] == NEG_INF) and torch.all(out.topk_ids[1, 2] == 0)


def test_vllm_choices_are_matched_by_index():
    body, prompts, k = recorded("vllm")
    doc = orjson.loads(body)
    doc["choices"].reverse()
    rows = get_protocol("vllm").parse(orjson.dumps(doc), prompts, k)
    np.testing.assert_array_equal(rows.topk_ids, RECORDED_IDS)


# ---- what a valid row must hold ----------------------------------------------------------------

MODEL = BigramModel()  # the canned server's model (vocabulary 256, the last 4 ids impossible)
K = 3
# Sequence 0, position 2 (row 1) scores token 3 given 2: outside the top 3, so vLLM sends K + 1 entries
# there; sequence 1 is greedy, so every vLLM position of it has K entries.
SEQUENCES = [[1, 2, 3, 4, 5], greedy(MODEL, 9, 4)]


def body_for(protocol: str, sequences=SEQUENCES, k: int = K):
    return (vllm_completion_body(MODEL, sequences, k) if protocol == "vllm" else
            sglang_generate_body(MODEL, sequences, k))


def vllm_position(body: dict, sequence: int = 0, position: int = 2) -> dict:
    return body["choices"][sequence]["prompt_logprobs"][position]


def sglang_top(body: list, sequence: int = 0, position: int = 2) -> list:
    return body[sequence]["meta_info"]["input_top_logprobs"][position]


def by_rank(position: dict, rank: int, actual: int = 3) -> str:
    return next(key for key, entry in position.items() if entry["rank"] == rank and key != str(actual))


def rename(position: dict, old: str, new: str) -> None:
    position[new] = position.pop(old)


def set_all(position: dict, field: str, value) -> None:
    for entry in position.values():
        entry[field] = value


def test_the_chosen_positions_are_what_the_cases_below_assume():
    assert len(vllm_position(body_for("vllm"))) == K + 1 and vllm_position(body_for("vllm"))["3"]["rank"] > K
    assert all(len(p) == K for p in body_for("vllm")["choices"][1]["prompt_logprobs"][1:])


def _drop_top1(body):
    del vllm_position(body)[by_rank(vllm_position(body), 1)]


def _swap_in_rank9(body):
    position = vllm_position(body)
    del position[by_rank(position, 3)]
    position["200"] = {"logprob": -20.0, "rank": 9, "decoded_token": None}


def _duplicate_key(body):
    position = vllm_position(body)
    rename(position, by_rank(position, 2), "0" + by_rank(position, 1))  # "07" next to "7"


def _rename_top(rank: int, new):
    """A mutation: the key of the rank-``rank`` entry of sequence 0, position 2 → ``new(old key)``."""
    return lambda body: rename(vllm_position(body), by_rank(vllm_position(body), rank),
                               new(by_rank(vllm_position(body), rank)))


def _vllm_update(key: str, sequence: int = 0, position: int = 2, **fields):
    return lambda body: vllm_position(body, sequence, position)[key].update(fields)


def _vllm_set_all(field: str, value):
    return lambda body: set_all(vllm_position(body), field, value)


def _top_set(field: int, value, entry: int = 0):
    """A mutation: element ``field`` (0 logprob, 1 id) of top entry ``entry``, sequence 0 position 2."""
    def mutate(body):
        sglang_top(body)[entry][field] = value
    return mutate


def _token_set(field: int, value, sequence: int = 0, position: int = 2):
    def mutate(body):
        body[sequence]["meta_info"]["input_token_logprobs"][position][field] = value
    return mutate


def _vllm_shifted_by_one(body):
    """Sequence 1's entries one position early: no leading null, the last entry repeated to keep the
    length. Read from position 1 on, every row would score the wrong token."""
    entries = body["choices"][1]["prompt_logprobs"]
    entries[:] = entries[1:] + entries[-1:]


def _sglang_duplicate(body):
    sglang_top(body)[1][1] = sglang_top(body)[0][1]


def _sglang_all_null(body):
    for entry in sglang_top(body):
        entry[0] = None


def _sglang_first_top_junk(body):
    body[0]["meta_info"]["input_top_logprobs"][0] = "junk"


DEFECTIVE_BODIES = {
    # name: (protocol, mutate(body), (sequence, position), message)
    "vllm top-1 missing, K entries": ("vllm", _drop_top1, (0, 2), r"the actual token 3 has rank \d+ > 3 but only 3 "
                                                                  r"entries came: one of the top 3 is missing"),
    "vllm a rank-9 entry for a top one": ("vllm", _swap_in_rank9, (0, 2), r"token 200 has rank 9 > 3 but is not the "
                                                                          r"actual token \(3\): one of the top 3 is "
                                                                          r"missing"),
    "vllm greedy position, actual rank > K": ("vllm", _vllm_update(str(SEQUENCES[1][3]), 1, 3, rank=7), (1, 3),
                                              rf"the actual token {SEQUENCES[1][3]} has rank 7 > 3 but only 3"),
    "vllm key with a space": ("vllm", _rename_top(1, lambda key: " " + key), (0, 2), r"key ' \d+' is not a token id"),
    "vllm key with a sign": ("vllm", _rename_top(1, lambda key: "+" + key), (0, 2), r"key '\+\d+' is not a token id"),
    "vllm key with an underscore": ("vllm", _rename_top(1, lambda key: "1_4"), (0, 2), r"key '1_4' is not a token id"),
    "vllm key of non-ASCII digits": ("vllm", lambda body: rename(vllm_position(body), "3", "\u0663"), (0, 2),
                                     "key '\u0663' is not a token id"),
    "vllm empty key": ("vllm", _rename_top(2, lambda key: ""), (0, 2), r"key '' is not a token id"),
    "vllm duplicate id (07 and 7)": ("vllm", _duplicate_key, (0, 2), r"token \d+ appears twice in one position"),
    "vllm true logprob": ("vllm", _vllm_set_all("logprob", True), (0, 2), r"token \d+: .* has no numeric 'logprob'"),
    "vllm false logprob": ("vllm", _vllm_update("3", logprob=False), (0, 2), r"token 3: .* has no numeric 'logprob'"),
    "vllm string logprob": ("vllm", _vllm_update("3", logprob="-0.5"), (0, 2), r"token 3: .* has no numeric"),
    "vllm null logprob": ("vllm", _vllm_update("3", logprob=None), (0, 2), r"token 3: .* has no numeric 'logprob'"),
    "vllm positive logprob": ("vllm", _vllm_set_all("logprob", 5.0), (0, 2), r"log-probability 5.0: positive"),
    "vllm missing rank": ("vllm", lambda body: vllm_position(body)["3"].pop("rank"), (0, 2),
                          r"token 3: .* has no integer 'rank'"),
    "vllm rank 0": ("vllm", _vllm_update("3", rank=0), (0, 2), r"token 3 has rank 0 < 1"),
    "vllm all -9999": ("vllm", _vllm_set_all("logprob", -9999.0), (0, 2), r"no finite log-probability among the top"),
    "vllm first prompt_logprobs entry not null": ("vllm", _vllm_shifted_by_one, (1, 0), r"the first prompt_logprobs "
                                                                                     r"entry is not null"),
    "sglang float id": ("sglang", _top_set(1, 14.0), (0, 2), r"input_top_logprobs: .* has a non-integer token id"),
    "sglang string id": ("sglang", _top_set(1, "14"), (0, 2), r"input_top_logprobs: .* has a non-integer token id"),
    "sglang bool id": ("sglang", _top_set(1, True), (0, 2), r"input_top_logprobs: .* has a non-integer token id"),
    "sglang negative id": ("sglang", _top_set(1, -5, entry=2), (0, 2), r"negative token id -5"),
    "sglang string logprob": ("sglang", _top_set(0, "-0.5"), (0, 2), r"input_top_logprobs: .* non-numeric logprob"),
    "sglang bool logprob": ("sglang", _top_set(0, False), (0, 2), r"input_top_logprobs: .* non-numeric logprob"),
    "sglang positive logprob": ("sglang", _top_set(0, 0.5), (0, 2), r"log-probability 0.5: positive"),
    "sglang duplicate id": ("sglang", _sglang_duplicate, (0, 2), r"token \d+ appears twice in one position"),
    "sglang all-null top": ("sglang", _sglang_all_null, (0, 2), r"no finite log-probability among the top 3"),
    "sglang null above finite": ("sglang", _top_set(0, None), (0, 2), r"a null log-probability .* comes before a "
                                                                      r"finite one"),
    "sglang non-integer actual id": ("sglang", _token_set(1, 3.0), (0, 2), r"input_token_logprobs: .* non-integer"),
    "sglang positive actual logprob": ("sglang", _token_set(0, 0.25), (0, 2), r"the actual token's log-probability "
                                                                              r"0.25 is positive"),
    "sglang first top entry not null": ("sglang", _sglang_first_top_junk, (0, 0), r"the first input_top_logprobs "
                                                                                  r"entry is 'junk', not null"),
    "sglang first token logprob not null": ("sglang", _token_set(0, -1.5, 1, 0), (1, 0), r"the first "
                                            r"input_token_logprobs entry .* has a logprob; expected null"),
}


@pytest.mark.parametrize("case", list(DEFECTIVE_BODIES))
def test_malformed_or_inconsistent_values_are_rejected_not_coerced(case):
    """Ids, ranks and log-probabilities are checked, never coerced (a ' 14', '+14', '١' or '07' key, a
    float or string id, a bool or string log-probability); rows must be a distribution with the true
    top K (vLLM ranks); the error names the sequence and token position."""
    protocol, mutate, (sequence, position), message = DEFECTIVE_BODIES[case]
    body = body_for(protocol)
    mutate(body)
    with pytest.raises(ResponseMismatch, match=message) as caught:
        get_protocol(protocol).parse(orjson.dumps(body), SEQUENCES, K)
    assert (caught.value.sequence, caught.value.position) == (sequence, position)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_what_a_valid_row_may_hold(protocol):
    """Accepted: an actual token of probability 0 (its log-probability stays −inf), −inf (vLLM −9999,
    SGLang null) for entries below the finite ones, a log-probability a rounding error above 0 (the
    row's mass then a rounding error above 1), and (vLLM) K + 1 entries whose actual token ties with
    the K-th (rank ≤ K)."""
    sequences = [[1, 255, 3, 4]]  # 255 has probability 0 after 1
    body = body_for(protocol, sequences)
    if protocol == "vllm":
        position = vllm_position(body, 0, 2)
        assert len(position) == K + 1
        position[by_rank(position, 1)]["logprob"] = 5e-4
        position[by_rank(position, 2)]["logprob"] = -9999.0
        position[by_rank(position, 3)]["logprob"] = position["3"]["logprob"] = -9999.0
        position = vllm_position(body, 0, 3)
        third = position[by_rank(position, 3, actual=4)]["logprob"]
        position["4"].update(logprob=third, rank=3)  # a tie with the third: K + 1 entries, rank ≤ K
    else:
        top = sglang_top(body, 0, 2)
        top[0][0], top[1][0], top[2][0] = 5e-4, None, None
    rows = get_protocol(protocol).parse(orjson.dumps(body), sequences, K)
    assert rows.token_logprobs[0] == NEG_INF and np.isfinite(rows.topk_logprobs[:, 0]).all()
    assert rows.topk_logprobs[1, 0] == np.float32(5e-4) and rows.topk_logprobs[1, 2] == NEG_INF
    assert rows.topk_ids[1, 0] == MODEL.topk(sequences[0], K)[1][1, 0]
    if protocol == "vllm":
        assert rows.token_logprobs[1] == NEG_INF and rows.token_logprobs[2] == np.float32(third)
        np.testing.assert_array_equal(rows.topk_logprobs[2], MODEL.topk(sequences[0], K)[0][2])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_top_k_probabilities_summing_above_one_are_rejected_as_logits_not_log_probabilities(protocol):
    """A position whose top-K probabilities sum past 1 + 1e-3 is no distribution (a server sending logits,
    e.g. vLLM's --logprobs-mode raw_logits): rejected while parsing, naming the cause and the fix, so
    the losses need not check the mass on the device."""
    body = body_for(protocol)
    if protocol == "vllm":
        set_all(vllm_position(body), "logprob", -0.1)
    else:
        for entry in sglang_top(body):
            entry[0] = -0.1
    with pytest.raises(ResponseMismatch, match=r"the top 3 probabilities sum to 2\.7145 > 1: these are not the "
                                               r"log-probabilities of one distribution \(logits\? .*raw_logits.*\); "
                                               r"serve log-probabilities") as caught:
        get_protocol(protocol).parse(orjson.dumps(body), SEQUENCES, K)
    assert (caught.value.sequence, caught.value.position) == (0, 2)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_ids_outside_the_vocabulary_the_loss_indexes_are_rejected_while_parsing(protocol):
    """Given the vocabulary size the loss indexes, an id at or above it (another model's vocabulary) is
    rejected naming the position, the id, the vocabulary and the fix; without it ids are not bounded."""
    body = body_for(protocol)
    top_ids = sorted(MODEL.topk(SEQUENCES[0], K)[1][1].tolist())  # the ids of sequence 0, position 2
    vocab_size = top_ids[-1]  # the largest of them is then just outside
    parser = get_protocol(protocol)
    parser.parse(orjson.dumps(body), SEQUENCES, K)
    with pytest.raises(ResponseMismatch, match=rf"token id {top_ids[-1]} is outside the vocabulary the loss "
                                               rf"indexes, \[0, {vocab_size}\): the server serves a model with "
                                               rf"another vocabulary \(.*projection built for it") as caught:
        parser.parse(orjson.dumps(body), SEQUENCES, K, vocab_size=vocab_size)
    assert (caught.value.sequence, caught.value.position) == (0, 2)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_rows_that_parse_pass_every_check_of_the_losses(protocol):
    """Everything ``validate_teacher_topk`` checks on the device (no NaN or +inf, −inf only for absent
    entries, ids in the vocabulary and distinct, mass ≤ 1) is already checked while parsing: the trainer
    runs its losses unvalidated (``loss.validate_inputs=false``) on remote scores."""
    from megatron_mopd.losses.topk import validate_teacher_topk

    model, k = BigramModel(vocab_size=12, seed=1), 10  # the top 10 of 12 reach the 4 impossible ids
    sequences = random_sequences(16, 12, seed=3, lengths=(2, 30))
    body = (vllm_completion_body if protocol == "vllm" else sglang_generate_body)(model, sequences, k)
    rows = get_protocol(protocol).parse(orjson.dumps(body), sequences, k, vocab_size=model.vocab_size)
    logprobs, ids = torch.from_numpy(rows.topk_logprobs), torch.from_numpy(rows.topk_ids)
    assert (logprobs == NEG_INF).any()  # absent entries are exercised
    validate_teacher_topk(logprobs, ids, model.vocab_size, check_mass=True, leading_shape=logprobs.shape[:-1],
                          vocabulary="teacher")


def test_a_remote_teacher_given_its_vocabulary_fails_a_response_with_an_id_outside_it():
    """``RemoteTeacher.vocab_size`` (the trainer sets the vocabulary each teacher's loss indexes) makes a
    response holding an id at or above it a TeacherResponseError naming server, sequence and position."""
    sequences = [[5, 6, 7, 8, 9, 10]]
    largest = int(max(MODEL.topk(sequences[0], K)[1].max(), max(sequences[0])))
    with CannedServer() as server, RemoteTeacher(server.url, "vllm", topk=K, **FAST) as teacher:
        teacher.vocab_size = largest
        with pytest.raises(TeacherResponseError, match=rf"{server.url}/v1/completions: bad response .*sequence 0 "
                                                       rf"\(item 0 of the request\), token position \d+: token id "
                                                       rf"{largest} is outside the vocabulary the loss indexes"):
            teacher.score(sequences)
        teacher.vocab_size = largest + 1
        assert teacher.score(sequences).topk_ids.max() == largest


def test_a_server_of_another_vocabulary_fails_at_start_up_when_the_vocabulary_is_given():
    probe_ids = MODEL.topk([0, 1], K)[1]  # what the start-up probe (tokens 0, 1) gets back
    with CannedServer() as server:
        with pytest.raises(TeacherConfigError, match=r"/v1/completions: the start-up probe's answer: token id \d+ "
                                                     r"is outside the vocabulary the loss indexes"):
            RemoteTeacher(server.url, "vllm", topk=K, vocab_size=int(probe_ids.max()), **FAST)


def test_a_new_kind_of_defect_is_a_teacher_response_error_naming_sequence_and_position():
    body = body_for("vllm")
    _drop_top1(body)
    with CannedServer() as server, RemoteTeacher(server.url, "vllm", topk=K, **FAST) as teacher:
        server.replay(orjson.dumps(body))
        with pytest.raises(TeacherResponseError, match=r"bad response to a request of 2 sequences / 9 tokens: "
                                                       r"sequence 0 \(item 0 of the request\), token position 2: "
                                                       r"the actual token 3 has rank \d+ > 3 but only 3 entries"):
            teacher.score(SEQUENCES)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_invalid_rows_hold_zero_token_logprobs(protocol):
    """Rows past a sequence's end: token log-probability 0.0 (as the colocated teacher), −inf top-K,
    ids 0, so masked sums stay finite; a valid row keeps −inf for a token of probability 0."""
    with CannedServer() as server, RemoteTeacher(server.url, protocol, topk=4, **FAST) as teacher:
        out = teacher.score([[1, 2, 3, 4, 5], [1, 2], [1, 255, 3]])
    assert out.valid.tolist() == [[True] * 4, [True, False, False, False], [True, True, False, False]]
    assert out.token_logprobs[~out.valid].tolist() == [0.0] * 5
    assert torch.all(out.topk_logprobs[~out.valid] == NEG_INF) and torch.all(out.topk_ids[~out.valid] == 0)
    assert torch.isfinite((out.token_logprobs * out.valid)[:2].sum())
    assert out.token_logprobs[2, 0] == NEG_INF and torch.isfinite(out.token_logprobs[2, 1])


# ---- batching and balancing --------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_many_ragged_sequences_split_into_requests(protocol):
    """Exact scores for ragged sequences (length 1 included, impossible tokens → −inf, greedy runs
    with the actual token inside the top K), split by sequence and token limits."""
    with CannedServer() as server:
        sequences = random_sequences(23, server.model.vocab_size, seed=1) + [greedy(server, 7, 12), [3]]
        sequences[0][1:3] = [server.model.vocab_size - 1, 5]  # probability 0 under the model
        with RemoteTeacher(server.url, protocol, topk=6, max_sequences_per_request=4,
                           max_tokens_per_request=60, **FAST) as teacher:
            probes = server.scoring_requests
            out = teacher.score(sequences)
        log = server.scoring_log[probes:]
    assert_same(out, expected_scores(server, sequences, 6))
    assert out.token_logprobs[0, 0] == NEG_INF
    scored = [s for s in sequences if len(s) >= 2]
    assert sum(n for n, _ in log) == len(scored) and sum(t for _, t in log) == sum(map(len, scored))
    assert all(n <= 4 and (t <= 60 or n == 1) for n, t in log) and len(log) >= len(scored) // 4 + 1


def test_empty_and_trivial_batches():
    with CannedServer() as server, RemoteTeacher(server.url, "vllm", topk=3, **FAST) as teacher:
        empty, single = teacher.score([]), teacher.score([[5]])
        assert server.scoring_requests == 1  # the start-up probe only
        as_tensor, as_list = teacher.score([torch.tensor([4, 2, 9])]), teacher.score([[4, 2, 9]])
    assert empty.topk_logprobs.shape == (0, 0, 3) and single.topk_logprobs.shape == (1, 0, 3)
    assert_same(as_tensor, as_list)
    with pytest.raises(ValueError, match="negative token id"):
        teacher.submit([[1, -100, 2]])
    with pytest.raises(ValueError, match="http://host:port"):
        RemoteTeacher("localhost:8000")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_load_balancing_over_two_servers(protocol):
    with CannedServer() as a, CannedServer() as b:
        sequences = random_sequences(12, 256, seed=2, lengths=(2, 20))
        with RemoteTeacher([a.url, b.url], protocol, topk=4, max_sequences_per_request=1,
                           max_in_flight_per_server=2, **FAST) as teacher:
            out = teacher.score(sequences)
        assert_same(out, expected_scores(a, sequences, 4))
        served = [len(a.scoring_log) - 1, len(b.scoring_log) - 1]  # minus each one's start-up probe
    assert sum(served) == 12 and min(served) >= 3, served


def test_server_failing_health_is_left_out():
    with CannedServer() as good, CannedServer() as bad:
        bad.healthy = False
        with RemoteTeacher([bad.url, good.url], "vllm", topk=4, max_sequences_per_request=1, **FAST) as teacher:
            assert teacher.healthy_urls == [good.url]
            sequences = random_sequences(6, 256, seed=3, lengths=(2, 10))
            assert_same(teacher.score(sequences), expected_scores(good, sequences, 4))
        assert bad.scoring_requests == 0 and bad.requests["/health"] == 1 and good.scoring_requests == 7
        good.healthy = False
        with pytest.raises(TeacherRequestError, match=r"no teacher server is healthy: .*/health: HTTP 503"):
            RemoteTeacher([bad.url, good.url], "vllm", topk=4, **FAST)


def test_model_name_is_discovered():
    with CannedServer(model_name="Qwen/Qwen2.5-7B") as server:
        with RemoteTeacher(server.url, "vllm", topk=2, **FAST) as teacher:
            assert teacher.model == "Qwen/Qwen2.5-7B"
        with RemoteTeacher(server.url, "vllm", topk=2, model="given", **FAST) as teacher:
            assert teacher.model == "given" and server.requests["/v1/models"] == 1


# ---- faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("fault", ["http_503", "http_429", "drop_connection"])
def test_transient_failures_are_retried(protocol, fault):
    with CannedServer() as server, RemoteTeacher(server.url, protocol, topk=4, retries=3, **FAST) as teacher:
        sequences = random_sequences(5, 256, seed=4, lengths=(2, 15))
        server.inject(fault, times=2)
        assert_same(teacher.score(sequences), expected_scores(server, sequences, 4))
        assert server.scoring_requests == 1 + 3  # the probe, two failures, the success


class RecordedBackoff:
    """Stands in for the ``time`` and ``random`` modules of ``teachers.remote``: ``sleep`` records the
    wait instead of sleeping, ``uniform`` records its bounds and returns the next scripted jitter."""

    def __init__(self, jitters: list[float]):
        self.waits: list[float] = []
        self.bounds: list[tuple[float, float]] = []
        self._jitters = iter(jitters)
        self.monotonic = time.monotonic

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)

    def uniform(self, low: float, high: float) -> float:
        self.bounds.append((low, high))
        return next(self._jitters)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_retries_wait_backoff_doubling_per_attempt_times_a_jitter_in_half_to_one_and_a_half(protocol, monkeypatch):
    """Before retry i (i = 0, 1, ...) the client waits ``backoff_s · 2^i · U(0.5, 1.5)``; nothing before
    the first attempt, nor after the last failed one."""
    from megatron_mopd.teachers import remote

    backoff = RecordedBackoff(jitters=[1.0, 1.5, 0.5, 1.0, 1.0, 1.0])
    with CannedServer() as server, RemoteTeacher(server.url, protocol, topk=4, retries=3, backoff_s=2.0,
                                                 timeout_s=10.0) as teacher:
        monkeypatch.setattr(remote, "time", backoff)
        monkeypatch.setattr(remote, "random", backoff)
        sequences = random_sequences(3, 256, seed=6, lengths=(2, 10))
        assert_same(teacher.score(sequences), expected_scores(server, sequences, 4))
        assert backoff.waits == []  # no failure, no wait

        server.inject("http_503", times=3)
        assert_same(teacher.score(sequences), expected_scores(server, sequences, 4))
        assert backoff.waits == [2.0 * 1 * 1.0, 2.0 * 2 * 1.5, 2.0 * 4 * 0.5]
        assert backoff.bounds == [(0.5, 1.5)] * 3

        server.inject("http_503", times=4)
        with pytest.raises(TeacherRequestError, match="failed after 4 attempts"):
            teacher.score(sequences)
        assert backoff.waits[3:] == [2.0 * 1 * 1.0, 2.0 * 2 * 1.0, 2.0 * 4 * 1.0]  # and none after attempt 4


def test_closed_keep_alive_connection_is_replaced_without_using_a_retry():
    with CannedServer() as server, RemoteTeacher(server.url, "vllm", topk=4, retries=0, **FAST) as teacher:
        sequences = [[1, 2, 3, 4]]
        first = teacher.score(sequences)  # opens the worker's keep-alive connection
        server.inject("drop_connection")  # the server closes it (as after an idle timeout)
        assert_same(teacher.score(sequences), first)
        assert server.scoring_requests == 1 + 3


def test_retries_exhausted_error_names_server_request_attempts_and_cause():
    with CannedServer() as server, RemoteTeacher(server.url, "vllm", topk=4, retries=2, **FAST) as teacher:
        server.inject("http_503", times=3)
        with pytest.raises(TeacherRequestError, match=rf"a request of 2 sequences / 7 tokens to /v1/completions "
                                                      rf"failed after 3 attempts: attempt 1 at {server.url}: "
                                                      rf"HTTP 503: .*scripted HTTP 503.*attempt 3"):
            teacher.score([[1, 2, 3], [4, 5, 6, 7]])


def test_retry_moves_to_the_other_server():
    with CannedServer() as flaky, CannedServer() as steady:
        with RemoteTeacher([flaky.url, steady.url], "sglang", topk=4, retries=1, max_sequences_per_request=1,
                           **FAST) as teacher:
            flaky.inject("http_503", times=100)
            sequences = random_sequences(4, 256, seed=5, lengths=(2, 12))
            assert_same(teacher.score(sequences), expected_scores(steady, sequences, 4))
        assert len(steady.scoring_log) - 1 == 4


def test_client_errors_are_not_retried():
    with CannedServer() as server, RemoteTeacher(server.url, "vllm", topk=4, retries=3, **FAST) as teacher:
        server.inject("http_400")
        with pytest.raises(TeacherRequestError, match=r"/v1/completions refused a request of 1 sequences / 3 "
                                                      r"tokens: HTTP 400: .*not retried"):
            teacher.score([[1, 2, 3]])
        assert server.scoring_requests == 2


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_hanging_server_times_out_with_a_clear_error(protocol):
    with CannedServer(hang_s=10.0) as server:
        with RemoteTeacher(server.url, protocol, topk=4, retries=1, backoff_s=0.01, timeout_s=0.3) as teacher:
            server.inject("hang", times=2)
            with pytest.raises(TeacherRequestError, match=rf"1 sequences / 4 tokens .* failed after 2 attempts: "
                                                          rf"attempt 1 at {server.url}: timed out.*attempt 2"):
                teacher.score([[1, 2, 3, 4]])


def test_no_healthy_server_is_an_error_never_a_hang():
    """``check`` finding no healthy server raises and keeps the servers in use, so a request then fails
    (here: the server is really down) or succeeds but never waits forever; a later ``check`` restores
    service. A request that finds no server in use at all fails at once, naming the servers."""
    sequences = [[1, 2, 3, 4], [5, 6, 7]]
    with CannedServer() as server, RemoteTeacher(server.url, "vllm", topk=4, retries=0, **FAST) as teacher:
        server.healthy = False
        with pytest.raises(TeacherRequestError, match=r"no teacher server is healthy: .*/health: HTTP 503"):
            teacher.check()
        assert teacher.healthy_urls == [server.url]
        server.inject("http_503")
        with pytest.raises(TeacherRequestError, match=r"failed after 1 attempts: .*HTTP 503"):
            teacher.submit(sequences).result(timeout=30)
        server.healthy = True
        teacher.check()
        assert_same(teacher.submit(sequences).result(timeout=30), expected_scores(server, sequences, 4))
        for each in teacher._servers:  # not reachable through check() any more: no server in use
            each.enabled = False
        with pytest.raises(TeacherRequestError, match=rf"no teacher server is in use \(none of {server.url} passed "
                                                      rf"the last health check\): call check\(\)"):
            teacher.submit(sequences).result(timeout=30)
        teacher.check()
        assert_same(teacher.submit(sequences).result(timeout=30), expected_scores(server, sequences, 4))


def test_a_server_brought_in_by_check_serves_requests_waiting_for_a_slot():
    """``check`` wakes requests waiting for a slot, so a server it brings in serves them at once."""
    busy, spare = CannedServer(hang_s=60.0), CannedServer()
    with busy, spare:
        spare.healthy = False
        teacher = RemoteTeacher([busy.url, spare.url], "vllm", topk=4, retries=0, max_in_flight_per_server=1, **FAST)
        try:
            assert teacher.healthy_urls == [busy.url]
            teacher.reevaluate_s = 600.0  # only check()'s wake-up can move the waiting request
            busy.inject("hang")
            probes = busy.scoring_requests
            futures = [teacher.submit([[1, 2, 3]]), teacher.submit([[4, 5, 6]])]
            for _ in range(1000):  # until the first request hangs on the busy server; the other waits
                if busy.scoring_requests > probes:
                    break
                time.sleep(0.01)
            spare.healthy = True
            teacher.check()
            done, _ = wait(futures, timeout=30, return_when=FIRST_COMPLETED)
            assert len(done) == 1
            served = done.pop()
            sequence = [[1, 2, 3]] if served is futures[0] else [[4, 5, 6]]
            assert_same(served.result(), expected_scores(spare, sequence, 4))
            assert len(spare.scoring_log) == 2  # the probe and the waiting request
        finally:
            busy.__exit__(None, None, None)  # ends the hang now (exiting again below is harmless)
            teacher.close()


@pytest.mark.parametrize("keep_alive", [False, True])
def test_connections_are_forgotten_once_closed(keep_alive):
    """A server that closes every connection (HTTP/1.0, an expiring keep-alive) leaves no closed
    connection tracked: at most one per worker thread and server stays open."""
    with CannedServer(keep_alive=keep_alive) as server, RemoteTeacher(
            server.url, "sglang", topk=4, max_sequences_per_request=1, max_in_flight_per_server=2, **FAST) as teacher:
        sequences = random_sequences(8, 256, seed=12, lengths=(2, 10))
        for _ in range(5):
            assert_same(teacher.score(sequences), expected_scores(server, sequences, 4))
        tracked = len(teacher._connections)
        assert (1 <= tracked <= 2 if keep_alive else tracked == 0) and server.scoring_requests == 1 + 40


def test_parsing_holds_off_gc_without_undoing_the_trainers_gc_settings():
    """Parsing raises the generation-0 threshold (restored when the last concurrent parse ends) and never
    touches gc.isenabled(): a trainer's gc.disable() or gc.set_threshold() made meanwhile stands."""
    enabled, thresholds = gc.isenabled(), gc.get_threshold()
    try:
        gc.enable()
        gc.set_threshold(700, 10, 10)
        with _gc_paused():
            assert gc.isenabled() and gc.get_threshold()[0] > 10 ** 6
            gc.disable()  # the trainer switches to manual GC meanwhile
        assert not gc.isenabled() and gc.get_threshold() == (700, 10, 10)
        gc.enable()
        with _gc_paused():
            with _gc_paused():  # a concurrent parse (another thread's, in use) ends first
                pass
            assert gc.get_threshold()[0] > 10 ** 6  # one still runs
            gc.set_threshold(123, 4, 5)  # the trainer's own thresholds
        assert gc.get_threshold() == (123, 4, 5) and gc.isenabled()
        gc.set_threshold(700, 10, 10)
        with _gc_paused():
            get_protocol("vllm").parse(*recorded("vllm"))
        assert gc.get_threshold() == (700, 10, 10) and gc.isenabled()
        with pytest.raises(ResponseMismatch):
            get_protocol("vllm").parse(b"{", [[1, 2]], 1)
        assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.set_threshold(*thresholds)
        gc.enable() if enabled else gc.disable()


DEFECTS = {
    # fault: (vLLM message, SGLang message); the fault hits the request's last sequence (index 2)
    "malformed_json": (r"malformed JSON \(.*\); \d+ bytes starting '\{\"id\":\"cmpl-",
                       r"malformed JSON \(.*\); \d+ bytes starting '\[\{\"text\""),
    "missing_position": (r"sequence 2 \(item 2 of the request\), token position 5: the entry is missing \(null\)",
                         r"sequence 2 \(item 2 of the request\), token position 5: the input_top_logprobs entry "
                         r"is missing \(null\)"),
    "wrong_length": (r"sequence 2 \(item 2 of the request\): wrong length: 10 prompt_logprobs entries for 11",
                     r"sequence 2 \(item 2 of the request\): wrong length: 10 input_top_logprobs entries for 11"),
    "wrong_ids": (r"sequence 2 \(item 2 of the request\), token position {p}: the actual token {t} is not among "
                  r"the 4 returned entries",
                  r"sequence 2 \(item 2 of the request\), token position {p}: input_token_logprobs has token id "
                  r"\d+ where {t} was sent"),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("fault", list(DEFECTS))
def test_defective_responses_are_errors_not_padding(protocol, fault):
    with CannedServer() as server, RemoteTeacher(server.url, protocol, topk=4, retries=3, **FAST) as teacher:
        sequences = random_sequences(2, 256, seed=6, lengths=(3, 8)) + [greedy(server, 9, 4)]
        sequences[2] += random_sequences(1, 252, seed=7, lengths=(7, 7))[0]  # then leaves the top K
        top_ids = server.model.topk(sequences[2], 4)[1]
        row = next(r for r in range(10) if sequences[2][r + 1] not in top_ids[r])
        message = DEFECTS[fault][PROTOCOLS.index(protocol)].replace("{p}", str(row + 1))
        message = message.replace("{t}", str(sequences[2][row + 1]))
        server.inject(fault)
        with pytest.raises(TeacherResponseError, match=rf"^{server.url}{teacher.protocol.path}: bad response to a "
                                                       rf"request of 3 sequences / \d+ tokens: {message}"):
            teacher.score(sequences)
        assert server.scoring_requests == 2  # not retried


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_topk_above_the_servers_limit_fails_at_start_with_the_fix(protocol):
    with CannedServer(max_logprobs=4) as server:
        fix = (r"rejects top-8 log-probabilities \(HTTP 400: .*greater than max allowed: 4.*\): start vLLM with "
               r"--max-logprobs >= 8, or lower topk" if protocol == "vllm" else
               r"does not return top-8 log-probabilities \(4 input_top_logprobs entries; expected 8\): lower topk")
        with pytest.raises(TeacherConfigError, match=fix):
            RemoteTeacher(server.url, protocol, topk=8, **FAST)
        with RemoteTeacher(server.url, protocol, topk=4, **FAST):
            pass


# ---- text mode (cross-tokenizer teachers) ------------------------------------------------------


def test_text_mode_returns_teacher_ids_and_offsets():
    from megatron_mopd.demo.tokenizers import byte_level_bpe, sentencepiece_bpe

    teacher_tokenizer, student_tokenizer = sentencepiece_bpe(), byte_level_bpe()
    texts = ["He said 你好吗 and 12345 + 678 = 13023.", "def f(x):\n    return x  # twice", "Hi"]
    with CannedServer(vocab_size=len(teacher_tokenizer)) as server:
        with RemoteTeacher(server.url, "sglang", topk=5, tokenizer=teacher_tokenizer, **FAST) as teacher:
            out = teacher.score_texts(texts)
        with RemoteTeacher(server.url, "sglang", topk=5, **FAST) as teacher:
            with pytest.raises(ValueError, match="submit_texts needs RemoteTeacher"):
                teacher.submit_texts(texts)
    encoded = teacher_tokenizer(texts, return_offsets_mapping=True)
    assert out.sequences == tuple(map(tuple, encoded["input_ids"]))
    assert_same(out, expected_scores(server, [list(s) for s in out.sequences], 5))
    for text, ids, offsets, expected in zip(texts, out.sequences, out.offsets, encoded["offset_mapping"]):
        assert offsets.shape == (len(ids), 2) and offsets.tolist() == [list(o) for o in expected]
        student = student_tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        assert align_offsets(student, offsets, text, text).num_chunks > 0


# ---- overlap -----------------------------------------------------------------------------------


def test_submit_early_overlaps_teacher_latency_with_student_compute():
    """Same results either way; prints the waiting fraction of a step (no timing assertion)."""
    weights = torch.randn(256, 256)

    def work(iterations: int) -> None:  # real CPU work
        x = torch.randn(256, 256)
        for _ in range(iterations):
            x = torch.tanh(x @ weights)

    began = time.perf_counter()
    work(20)
    iterations = max(1, round(20 * 0.1 / (time.perf_counter() - began)))  # sized to ~100 ms a step

    def student_step() -> None:
        work(iterations)

    with CannedServer(latency_s=0.15) as server:
        micro_batches = [random_sequences(4, 256, seed=10 + i, lengths=(16, 64)) for i in range(4)]
        with RemoteTeacher(server.url, "vllm", topk=8, max_in_flight_per_server=4, **FAST) as teacher:
            blocking = simulated_training_loop(teacher, micro_batches, student_step, submit_early=False)
            early = simulated_training_loop(teacher, micro_batches, student_step, submit_early=True)
    for a, b in zip(blocking.results, early.results):
        assert_same(a, b)
    print(f"\nwaiting fraction of a step: blocking {blocking.waiting_fraction:.0%} "
          f"({blocking.waited_s:.2f}/{blocking.total_s:.2f} s), submit-early {early.waiting_fraction:.0%} "
          f"({early.waited_s:.2f}/{early.total_s:.2f} s)")


# ---- against the reference server (a real HF model) --------------------------------------------

@pytest.fixture(scope="module")
def reference_server(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from megatron_mopd.demo.models import tiny_causal_lm_dir
    from megatron_mopd.teachers.server_process import teacher_server_process

    model_dir = tiny_causal_lm_dir()
    log_path = tmp_path_factory.mktemp("reference_server") / "server.log"
    with teacher_server_process(model_dir, "--max-logprobs", "8", log_path=log_path) as running:
        yield running, AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_reference_server_matches_the_model_in_process(reference_server, protocol):
    server, model = reference_server
    url = server.url
    teacher = RemoteTeacher(url, protocol, topk=8, max_sequences_per_request=2, **FAST)
    sequences = random_sequences(5, 2000, seed=11, lengths=(2, 24))
    with teacher:
        out = teacher.score(sequences)
    assert out.topk_logprobs.shape == (5, max(map(len, sequences)) - 1, 8)
    with torch.no_grad():
        for b, tokens in enumerate(sequences):
            logprobs = model(torch.tensor([tokens])).logits[0, :-1].float().log_softmax(-1)
            top = logprobs.topk(8, dim=-1)
            n = len(tokens) - 1
            assert out.valid[b].tolist() == [True] * n + [False] * (out.valid.shape[1] - n)
            torch.testing.assert_close(out.topk_logprobs[b, :n], top.values, rtol=0, atol=1e-5)
            assert torch.equal(out.topk_ids[b, :n], top.indices)
            torch.testing.assert_close(out.token_logprobs[b, :n], logprobs[torch.arange(n), tokens[1:]],
                                       rtol=0, atol=1e-5)
    fix = "start vLLM with --max-logprobs >= 9" if protocol == "vllm" else "lower topk"
    with pytest.raises(TeacherConfigError, match=rf"rejects top-9 log-probabilities \(HTTP 400: .*\): {fix}"):
        RemoteTeacher(url, protocol, topk=9, **FAST)


# --- the request deadline: a server that trickles its answer -------------------------------------


class _TrickleHandler(http.server.BaseHTTPRequestHandler):
    """A vLLM server (the canned bigram model) that answers ``/health`` at once and, once its server's
    ``trickling`` is set, sends each scoring answer a few bytes at a time: never silent for long (so no
    socket timeout fires), never done in time."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # the base class's signature
        pass

    def do_GET(self) -> None:  # the base class's naming
        self._answer(b"", trickle=False)

    def do_POST(self) -> None:  # the base class's naming
        request = orjson.loads(self.rfile.read(int(self.headers["Content-Length"])))
        body = orjson.dumps(vllm_completion_body(MODEL, request["prompt"], request["prompt_logprobs"]))
        self._answer(body, trickle=self.server.trickling)  # type: ignore[attr-defined]

    def _answer(self, body: bytes, trickle: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for start in range(0, len(body), 4 if trickle else len(body) or 1):
                self.wfile.write(body[start:start + (4 if trickle else len(body))])
                self.wfile.flush()
                if trickle:
                    time.sleep(0.02)
        except OSError:  # the client gave up
            self.close_connection = True


def test_a_request_outlasting_its_deadline_is_retried_then_fails_naming_the_deadline():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TrickleHandler)
    server.daemon_threads = True
    server.trickling = False  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with RemoteTeacher(url, "vllm", topk=4, model="m", timeout_s=2.0, retries=1, backoff_s=0.01,
                           request_deadline_s=0.3) as teacher:
            server.trickling = True  # type: ignore[attr-defined]
            with pytest.raises(TeacherRequestError) as failure:
                teacher.score([[1, 2, 3, 4, 5]])
    finally:
        server.shutdown()
        server.server_close()
    message = str(failure.value)
    assert "failed after 2 attempts" in message
    assert message.count("not answered in full within request_deadline_s=0.3 s") == 2


def test_the_request_deadline_defaults_to_twice_the_socket_timeout_and_must_be_positive():
    with CannedServer() as server:
        with RemoteTeacher(server.url, "vllm", topk=4, timeout_s=3.0) as teacher:
            assert teacher.request_deadline_s == 6.0
        with pytest.raises(ValueError, match="request_deadline_s must be > 0"):
            RemoteTeacher(server.url, "vllm", topk=4, request_deadline_s=0.0)
