"""The run's teachers: clients for remote servers, and the servers the trainer starts itself.

A colocated teacher (``placement: colocated``) is a Megatron-Core model with the student's layout,
loaded from its Hugging Face directory, run forward-only by every rank. A remote teacher entry either
lists ``urls`` (servers you run: vLLM, SGLang, ``mopd serve-teacher``) or names a ``model`` directory:
then local rank 0 of every node starts the reference teacher server on it (``mopd serve-teacher``, on
loopback, ``--max-logprobs`` = the teacher's top-K) before training and stops it after, so a small
run is one command. Only the ranks that fetch scores (the last pipeline stage's tensor/context-parallel
rank 0 of each data-parallel rank) hold a client; the others get ``None``. Every client is checked at
start (health, model name, and that the server accepts top-K).
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional

import torch.distributed as dist

from megatron_mopd.teachers import RemoteTeacher, TeacherError
from megatron_mopd.teachers.server_process import ServerProcess, teacher_server_process
from megatron_mopd.trainer.config import TeacherConfig


@contextlib.contextmanager
def open_teachers(
    configs: list[TeacherConfig], *, fetching: bool, log_dir: Path, colocated: Callable[[TeacherConfig], Any],
    say=print,
) -> Iterator[dict[str, Any]]:
    """Start the self-served teachers, connect the clients, build the colocated teachers; stop and close
    everything on exit.

    Collective over all ranks. Args:
        fetching: whether this rank fetches teacher scores (it then holds the remote clients).
        colocated: builds a colocated teacher (a ``ColocatedTeacher``, on every rank) from its config.
        log_dir: where the self-served servers write their logs (``teacher-<name>.log``).
        say: prints a progress line (on the reporting rank).
    """
    with contextlib.ExitStack() as stack:
        remote = [c for c in configs if c.placement == "remote"]
        urls = {c.name: list(c.urls) or stack.enter_context(_self_served(c, log_dir, say)) for c in remote}
        clients: dict[str, Any] = {}
        for config in configs:
            client = None
            if config.placement == "colocated":
                say(f"teacher {config.name}: loading {config.model} into Megatron (colocated)")
                client = colocated(config)
            elif fetching:
                say(f"teacher {config.name}: waiting up to {config.wait_for_servers_s:.0f} s for {urls[config.name]}")
                try:
                    client = stack.enter_context(RemoteTeacher(
                        urls[config.name], config.protocol, topk=config.topk, timeout_s=config.timeout_s,
                        retries=config.retries, wait_for_servers_s=config.wait_for_servers_s,
                        request_deadline_s=config.request_deadline_s,
                    ))
                except TeacherError as error:
                    raise type(error)(f"teacher {config.name!r}: {error}") from None
            clients[config.name] = client
        dist.barrier()
        yield clients
        dist.barrier()  # every rank is done with the servers before they stop


@contextlib.contextmanager
def _self_served(config: TeacherConfig, log_dir: Path, say) -> Iterator[list[str]]:
    """Local rank 0 of each node serves ``config.model``; every rank gets its node's URL."""
    log_path = log_dir / f"teacher-{config.name}-{socket.gethostname()}.log"
    flags = ("--max-logprobs", str(config.topk), "--served-model-name", config.name)

    def start() -> ContextManager[ServerProcess]:
        say(f"teacher {config.name}: starting the reference server on {config.model}")
        log_dir.mkdir(parents=True, exist_ok=True)
        return teacher_server_process(config.model, *flags, log_path=log_path,
                                      startup_timeout_s=config.wait_for_servers_s)

    with served_on_each_node(start, f"teacher {config.name!r}: the server for {config.model}") as (node_url, _):
        yield [node_url]


@contextlib.contextmanager
def served_on_each_node(start: Callable[[], ContextManager[ServerProcess]], what: str
                        ) -> Iterator[tuple[str, list[str]]]:
    """Local rank 0 of each node enters ``start()`` (a server process); every rank gets its node's URL and
    every node's URLs. Collective; a server that does not start fails every rank with ``what`` named."""
    starting = int(os.environ.get("LOCAL_RANK", "0")) == 0
    error: Optional[str] = None
    with contextlib.ExitStack() as stack:
        server = None
        if starting:
            try:
                server = stack.enter_context(start())
            except RuntimeError as caught:
                error = f"{what} did not start: {caught}"
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (socket.gethostname(), server.url if server else None, error))
        errors = [e for _, _, e in gathered if e]
        if errors:
            raise RuntimeError(errors[0])
        node_urls = {host: url for host, url, _ in gathered if url}
        yield node_urls[socket.gethostname()], sorted(set(node_urls.values()))
