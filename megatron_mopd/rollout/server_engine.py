"""On-policy sampling through inference servers that serve the student (vLLM, SGLang, or the reference
server ``mopd serve-teacher``), with the live student's weights pushed to them before sampling.

``ServerRolloutEngine.generate`` is collective over every rank of the student, as the Megatron-native
engine's is (each data-parallel replica passes its own prompts, its tensor/pipeline/context-parallel
ranks the same ones):

1. Weights. When ``weights_version()`` (the trainer passes its optimizer step count; equal on every
   rank) differs from the version last pushed (none at first), ``weight_sync.push(model)`` makes every
   server serve the model's current weights before anything is sampled.
2. Sampling. The lowest rank of each replica (the ranks of one data-parallel rank) sends the replica's
   prompts to its servers (``RemoteTeacher.generate``: one request per prompt, load-balanced, retried)
   with the seed ``mixed_seed(sampling.seed, data-parallel rank)``, so replicas draw distinct streams and
   a call is reproducible; prompt ``i`` then gets ``mixed_seed(that seed, i)``. The rollouts are
   broadcast to the rest of the replica, so every rank of it returns the same list. A failure on any
   rank is raised on every rank (one gather over the world), never left to a later collective's timeout.
   Each completion is cut at ``max_sequence_length`` total tokens ("length"), as the Megatron engine's.
   Padded-vocabulary ids cannot occur (the served vocabulary is the tokenizer's); an id at or above
   ``vocab_size`` is an error.

Behaviour log-probabilities. ``Rollout.logprobs`` must be log π of each sampled id after temperature,
before top-k/top-p truncation (``rollout.types``). What a server returns:

- vLLM, ``--logprobs-mode raw_logprobs`` (its default): log_softmax of the raw logits, before
  temperature and truncation: the behaviour policy only at temperature 1 (any top-k/top-p);
- vLLM, ``--logprobs-mode processed_logprobs``: after temperature and after top-k/top-p (truncated ids
  −inf, the rest renormalized): the behaviour policy only without top-k/top-p (any temperature ≥ 1e-5;
  below, vLLM samples greedily and returns the raw values). No vLLM mode gives "after temperature,
  before truncation" when both are on;
- SGLang: log_softmax(logits / temperature), before truncation (unless the server runs with
  SGLANG_RETURN_ORIGINAL_LOGPROB=1, which the engine cannot see): the behaviour policy, except when
  SGLang samples greedily (temperature < 1e-5 or top_k = 1; then the raw values: only temperature 1).

The engine reads a vLLM server's mode from its development endpoint ``GET /server_info`` and refuses
(ValueError, before sampling) a sampling the server cannot give the behaviour log-probabilities of,
naming the mode that would (``logprobs_mode_for``). vLLM's other modes (``raw_logits``,
``processed_logits``) are refused.

Weight sync (``WeightSync``: one collective ``push(model)``). ``DiskWeightSync`` is the disk-reload
implementation for both protocols: ``export_hf_weights`` (collective; rank 0 writes) into a staging
directory next to ``served_dir``, whose files rank 0 then renames into ``served_dir`` one by one
(``os.replace``: a reader sees a whole old or a whole new file, never a half-written safetensors; an
old file still memory-mapped by a server stays intact), removing weight files the export does not
have; then rank 0 tells every server to reload, and every rank learns the outcome:

- vLLM (``VLLM_SERVER_DEV_MODE=1``): ``POST /collective_rpc {"method": "reload_weights", "kwargs":
  {"weights_path": served_dir}}``, then ``POST /reset_prefix_cache`` (the cached keys/values were
  computed with the old weights; retried while the server reports ``success: false``);
- SGLang and the reference server: ``POST /update_weights_from_disk {"model_path": served_dir}``.

``served_dir`` must be the same path on the servers' hosts (a shared file system). vLLM 0.32's
in-memory weight-transfer engine (``/init_weight_transfer_engine``, ``/update_weights``) offers NCCL,
CUDA-IPC, Ray/NIXL and ModelExpress backends, none over gloo: on the CPU there is nothing to put behind
this interface yet, and a GPU implementation belongs behind the same ``push``.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Protocol, Sequence
from urllib.parse import urlsplit

import orjson
import torch.distributed as dist

from megatron_mopd.parallel.collectives import first_problem_of_all_ranks, on_rank0
from megatron_mopd.rollout.types import Rollout, SamplingParams, checked_prompts, mixed_seed

__all__ = ["DiskWeightSync", "ServerRolloutEngine", "WeightSync", "export_served", "logprobs_mode_for",
           "server_logprobs_mode"]

_GREEDY_BELOW = 1e-5  # vLLM's and SGLang's: smaller temperatures sample greedily
_WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json")
_RESET_ATTEMPTS = 20


class WeightSync(Protocol):
    """Makes the servers serve a model's current weights."""

    def push(self, model: Any) -> None:
        """Collective over every rank of the student; when it returns, every server samples from
        ``model``'s weights as they are now."""


def _behaviour_modes(sampling: SamplingParams) -> list[str]:
    """The vLLM ``--logprobs-mode`` values whose log-probabilities are the behaviour policy's for
    ``sampling`` (module doc), preferred first."""
    modes = []
    if sampling.top_k == 0 and sampling.top_p == 1.0 and sampling.temperature >= _GREEDY_BELOW:
        modes.append("processed_logprobs")
    if sampling.temperature == 1.0:
        modes.append("raw_logprobs")
    return modes


def logprobs_mode_for(sampling: SamplingParams) -> str:
    """The vLLM ``--logprobs-mode`` whose log-probabilities are the behaviour policy's for ``sampling``.

    Raises:
        ValueError: none is (a temperature other than 1 with top-k or top-p on).
    """
    modes = _behaviour_modes(sampling)
    if modes:
        return modes[0]
    raise ValueError(
        f"vLLM cannot return the behaviour log-probabilities (after temperature, before top-k/top-p) for "
        f"temperature={sampling.temperature} with top_k={sampling.top_k}, top_p={sampling.top_p}: its raw_logprobs "
        f"are before temperature, its processed_logprobs after truncation; sample at temperature 1, or without "
        f"top-k/top-p (then start vLLM with --logprobs-mode processed_logprobs), or use the megatron engine")


def _check_semantics(protocol: str, logprobs_mode: Optional[str], sampling: SamplingParams) -> None:
    """Raises ValueError unless the server's log-probabilities are the behaviour policy's (module doc)."""
    if protocol == "sglang":
        greedy = sampling.temperature < _GREEDY_BELOW or sampling.top_k == 1
        if greedy and sampling.temperature != 1.0:
            raise ValueError(f"SGLang samples temperature={sampling.temperature}, top_k={sampling.top_k} greedily "
                             "and then returns log-probabilities before temperature: use a temperature ≥ 1e-5 and "
                             "top_k != 1")
        return
    if logprobs_mode in _behaviour_modes(sampling):
        return
    try:
        wanted = f"start it with --logprobs-mode {logprobs_mode_for(sampling)}"
    except ValueError as error:
        wanted = str(error)
    raise ValueError(f"the vLLM server runs with --logprobs-mode {logprobs_mode}, whose log-probabilities are not "
                     f"the behaviour policy's for temperature={sampling.temperature}, top_k={sampling.top_k}, "
                     f"top_p={sampling.top_p}: {wanted}")


def _request(url: str, method: str, path: str, body: Optional[dict], timeout_s: float) -> tuple[int, bytes]:
    """One HTTP request on a fresh connection: (status, body)."""
    parts = urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname, parts.port, timeout=timeout_s)
    try:
        payload = None if body is None else orjson.dumps(body)
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        connection.request(method, parts.path.rstrip("/") + path, body=payload, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _call(url: str, method: str, path: str, body: Optional[dict], timeout_s: float, fix: str) -> Any:
    """The JSON answer (None for an empty body) of a request that must succeed; RuntimeError naming
    the server, the cause and ``fix`` otherwise."""
    try:
        status, reply = _request(url, method, path, body, timeout_s)
    except (OSError, http.client.HTTPException) as error:
        cause = f"timed out (no data for {timeout_s:g} s)" if isinstance(error, TimeoutError) else \
            f"{type(error).__name__}: {error}"
        raise RuntimeError(f"{method} {url}{path} failed: {cause}; {fix}") from None
    if status != 200:
        raise RuntimeError(f"{method} {url}{path} answered HTTP {status}: {reply[:300]!r}; {fix}")
    try:
        return orjson.loads(reply) if reply else None
    except orjson.JSONDecodeError:
        raise RuntimeError(f"{method} {url}{path} answered {reply[:300]!r}, not JSON; {fix}") from None


def server_logprobs_mode(url: str, timeout_s: float = 30.0) -> str:
    """A vLLM server's ``--logprobs-mode``, from ``GET /server_info?config_format=json`` (development mode).

    Raises:
        RuntimeError: the endpoint is not served (no ``VLLM_SERVER_DEV_MODE=1``) or does not say.
    """
    fix = "start vLLM with VLLM_SERVER_DEV_MODE=1 (the rollout engine reloads weights through its development " \
          "endpoints and reads its logprobs_mode there)"
    info = _call(url, "GET", "/server_info?config_format=json", None, timeout_s, fix)
    try:
        return str(info["vllm_config"]["model_config"]["logprobs_mode"])
    except (KeyError, TypeError):
        raise RuntimeError(f"{url}/server_info has no vllm_config.model_config.logprobs_mode; {fix}") from None


def export_served(model: Any, arch: Any, served_dir: str | os.PathLike, *, tokenizer: Any = None,
                  hf_config_fields: Optional[dict] = None) -> None:
    """Collective: write ``model`` as an HF checkpoint into ``served_dir`` (created when missing), file by
    file atomically, removing weight files of another layout (module doc)."""
    from megatron_mopd.models import export_hf_weights

    served_dir = Path(served_dir).absolute()
    staging = served_dir.parent / f".{served_dir.name}.push"
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    export_hf_weights(model, arch, staging, tokenizer=tokenizer, hf_config_fields=hf_config_fields)
    if dist.get_rank() == 0:
        served_dir.mkdir(parents=True, exist_ok=True)
        written = {path.name for path in staging.iterdir()}
        for pattern in _WEIGHT_FILES:  # weights of another layout (shards) would be loaded too
            for stale in served_dir.glob(pattern):
                if stale.name not in written:
                    stale.unlink()
        for name in sorted(written):
            os.replace(staging / name, served_dir / name)
        shutil.rmtree(staging)
    dist.barrier()


class DiskWeightSync:
    """``WeightSync`` through the file system: export into ``served_dir``, then every server reloads it
    (module doc).

    Args:
        served_dir: the directory the servers load (the same path on their hosts).
        urls: every server that samples for the student.
        protocol: ``"vllm"`` (``/collective_rpc`` reload_weights + ``/reset_prefix_cache``) or
            ``"sglang"`` (``/update_weights_from_disk``; also the reference server).
        arch: the student's ``GPTArchitecture``.
        tokenizer: saved with the weights when given (``save_pretrained``).
        hf_config_fields: extra fields of the written ``config.json`` (e.g. token ids).
        timeout_s: per request to a server (a reload reads the whole checkpoint).
    """

    def __init__(self, served_dir: str | os.PathLike, urls: Sequence[str], protocol: str, arch: Any, *,
                 tokenizer: Any = None, hf_config_fields: Optional[dict] = None, timeout_s: float = 600.0) -> None:
        if protocol not in ("vllm", "sglang"):
            raise ValueError(f"protocol must be vllm or sglang, got {protocol!r}")
        if not urls:
            raise ValueError("no server URL to push weights to")
        self.served_dir = Path(served_dir).absolute()
        self.urls, self.protocol, self.arch = list(urls), protocol, arch
        self.tokenizer, self.hf_config_fields, self.timeout_s = tokenizer, hf_config_fields, timeout_s

    def push(self, model: Any) -> None:
        export_served(model, self.arch, self.served_dir, tokenizer=self.tokenizer,
                      hf_config_fields=self.hf_config_fields)
        on_rank0(self._reload_all, "pushing the student's weights to the rollout servers")

    def _reload_all(self) -> None:
        for url in self.urls:
            self._reload(url)

    def _reload(self, url: str) -> None:
        if self.protocol == "sglang":
            fix = "is it an SGLang server (or mopd serve-teacher) that can read served_dir?"
            _call(url, "POST", "/update_weights_from_disk", {"model_path": str(self.served_dir)}, self.timeout_s, fix)
            return
        fix = "start vLLM with VLLM_SERVER_DEV_MODE=1 on a host that reads served_dir"
        _call(url, "POST", "/collective_rpc", {"method": "reload_weights",
                                                "kwargs": {"weights_path": str(self.served_dir)}}, self.timeout_s, fix)
        for _ in range(_RESET_ATTEMPTS):
            answer = _call(url, "POST", "/reset_prefix_cache", None, self.timeout_s, fix)
            if not isinstance(answer, dict) or answer.get("success", True):
                return
            time.sleep(0.1)  # requests still hold cache blocks
        raise RuntimeError(f"{url}/reset_prefix_cache kept answering success: false (requests still running?)")


class ServerRolloutEngine:
    """Samples completions from the student through inference servers (see the module docstring).

    Args:
        model: this rank's model chunk (wrappers are looked through by the weight sync's export).
        urls: the servers this rank's replica samples from (only its sampling rank connects).
        protocol: ``"vllm"`` or ``"sglang"`` (also the reference server's ``/generate``).
        weight_sync: pushes the model's weights to every server (``DiskWeightSync``).
        weights_version: the version of the model's weights (the optimizer step count), equal on every rank.
        vocab_size: the tokenizer's vocabulary size: prompt ids must be below it, and completion ids are.
        max_sequence_length: at most this many tokens per prompt + completion.
        timeout_s, retries, max_in_flight_per_server, wait_for_servers_s: of the client (``RemoteTeacher``).
        servers: servers started for this engine (a context already entered, e.g. an ``ExitStack``),
            exited by ``close`` once every rank is done with them.

    Raises:
        RuntimeError: on every rank, when a replica's servers are not healthy within ``wait_for_servers_s``,
            a vLLM server does not serve its development endpoints, or vLLM servers disagree on
            ``--logprobs-mode``. Collective.
    """

    def __init__(self, model: Any, *, urls: Sequence[str], protocol: str, weight_sync: WeightSync,
                 weights_version: Callable[[], int], vocab_size: int, max_sequence_length: int,
                 timeout_s: float = 600.0, retries: int = 3, max_in_flight_per_server: int = 64,
                 wait_for_servers_s: float = 0.0, servers: Optional[ContextManager[Any]] = None) -> None:
        from megatron.core import parallel_state

        from megatron_mopd.teachers import RemoteTeacher

        if vocab_size < 1 or max_sequence_length < 2:
            raise ValueError(f"need vocab_size >= 1 and max_sequence_length >= 2, got {vocab_size}, "
                             f"{max_sequence_length}")
        self.model, self.protocol, self.weight_sync = model, protocol, weight_sync
        self.weights_version, self.pushed_version = weights_version, None
        self.vocab_size, self.max_sequence_length = vocab_size, max_sequence_length
        self._servers = servers
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self._group, self.sampling = _replica_group(self.dp_rank)
        self.client: Optional[Any] = None
        modes: set[str] = set()
        error: Optional[str] = None
        if self.sampling:
            try:
                self.client = RemoteTeacher(urls, protocol, topk=1, timeout_s=timeout_s, retries=retries,
                                            max_in_flight_per_server=max_in_flight_per_server,
                                            wait_for_servers_s=wait_for_servers_s)
                if protocol == "vllm":
                    modes = {server_logprobs_mode(url, min(timeout_s, 60.0)) for url in self.client.healthy_urls}
            except Exception as caught:  # every rank must learn of it
                error = f"{type(caught).__name__}: {caught}"
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.dp_rank, sorted(modes), error))
        failed = next(((rank, cause) for rank, _, cause in gathered if cause is not None), None)
        modes = {mode for _, found, _ in gathered for mode in found}
        if failed is None and len(modes) > 1:
            failed = (self.dp_rank, f"the rollout servers run with different --logprobs-mode: {sorted(modes)}")
        if failed is not None:
            self.close()
            raise RuntimeError(f"the rollout servers of data-parallel rank {failed[0]}: {failed[1]}")
        self.logprobs_mode: Optional[str] = modes.pop() if modes else None

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Rollout]:
        """One completion per prompt, in order, on every rank of this replica (collective over all ranks).

        Raises:
            ValueError: a prompt is empty, holds an id outside the vocabulary or leaves no room for a
                completion, or the servers cannot return the behaviour log-probabilities of ``sampling``
                (module doc); before anything is pushed or sampled.
            RuntimeError: the weights could not be pushed, or sampling failed on some replica (the
                message names the replica and the cause: the server, the attempts, the fix).
        """
        prompts = checked_prompts(prompts, self.vocab_size, self.max_sequence_length)
        _check_semantics(self.protocol, self.logprobs_mode, sampling)
        version = self.weights_version()
        if version != self.pushed_version:
            self.weight_sync.push(self.model)
            self.pushed_version = version
        rollouts: Optional[list[Rollout]] = None
        error: Optional[BaseException] = None
        if self.sampling:
            try:
                rollouts = self._sample(prompts, sampling)
            except Exception as caught:  # every rank must learn of it
                error = caught
        shared = [rollouts, None if error is None else f"{type(error).__name__}: {error}"]
        if self._group is not None:
            dist.broadcast_object_list(shared, src=dist.get_process_group_ranks(self._group)[0], group=self._group)
        failed = first_problem_of_all_ranks(
            None if shared[1] is None else f"rollout sampling failed on data-parallel rank {self.dp_rank}: {shared[1]}")
        if failed is not None:
            raise RuntimeError(failed)
        return shared[0]

    def _sample(self, prompts: list[tuple[int, ...]], sampling: SamplingParams) -> list[Rollout]:
        replica = dataclasses.replace(sampling, seed=mixed_seed(sampling.seed, self.dp_rank))
        rollouts = self.client.generate(prompts, replica, max_total_tokens=self.max_sequence_length)
        for index, rollout in enumerate(rollouts):
            if rollout.completion_ids and max(rollout.completion_ids) >= self.vocab_size:
                raise RuntimeError(f"the server sampled id {max(rollout.completion_ids)} for prompt {index}, outside "
                                   f"the tokenizer's vocabulary [0, {self.vocab_size}): does it serve the student?")
        return rollouts

    def close(self, *, collective: bool = True) -> None:
        """Close this rank's connections; with ``servers``, wait for every rank (``collective``; not while
        an error unwinds, when other ranks may never arrive) and stop them."""
        if self.client is not None:
            self.client.close()
            self.client = None
        if self._servers is not None:
            servers, self._servers = self._servers, None
            if collective:
                dist.barrier()
            servers.__exit__(None, None, None)

    def __enter__(self) -> "ServerRolloutEngine":
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        self.close(collective=exc_type is None)


def _replica_group(dp_rank: int) -> tuple[Optional[Any], bool]:
    """This rank's replica (the ranks of its data-parallel rank) as a gloo group (None when it is this
    rank alone), and whether this rank is the replica's lowest, the one that samples. Collective."""
    replicas: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(replicas, dp_rank)
    mine = None
    for replica in sorted(set(replicas)):  # every rank creates every group, in the same order
        members = [rank for rank, each in enumerate(replicas) if each == replica]
        group = dist.new_group(members, backend="gloo") if len(members) > 1 else None
        if replica == dp_rank:
            mine = (group, members[0] == dist.get_rank())
    return mine

