"""Shared fixtures: the demo's reference teacher server, started once per test session."""

from __future__ import annotations

from typing import Iterator

import pytest

DEMO_TEACHER_MAX_LOGPROBS = 16


def _serve(asset: str, tmp_path_factory) -> Iterator[str]:
    from megatron_mopd.demo.assets import demo_asset_path
    from megatron_mopd.teachers.server_process import teacher_server_process

    log = tmp_path_factory.mktemp("teacher") / "server.log"
    with teacher_server_process(demo_asset_path(asset), "--max-logprobs", str(DEMO_TEACHER_MAX_LOGPROBS),
                                log_path=log) as server:
        yield server.url


@pytest.fixture(scope="session")
def demo_teacher_url(tmp_path_factory) -> Iterator[str]:
    """URL of ``mopd serve-teacher`` on the demo's teacher (``--max-logprobs 16``)."""
    yield from _serve("teacher", tmp_path_factory)


@pytest.fixture(scope="session")
def sp_teacher_url(tmp_path_factory) -> Iterator[str]:
    """URL of ``mopd serve-teacher`` on the demo's teacher with another tokenizer (``--max-logprobs 16``)."""
    yield from _serve("sp_teacher", tmp_path_factory)
