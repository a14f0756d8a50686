"""A run on another engine, found again from a new kernel: resumed, attached and stopped.

Two engines of their own, each a second dockerd on a loopback port with TLS: one reached
as a plain ``tcp://`` engine, one made a one-node swarm and reached as ``swarm://``. A
first kernel starts a keepAlive pod there through ``$CLDPD_ENGINES`` and is shut down; a
second kernel lists the run, attaches to it, resumes it and stops it, through the magics.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from engines_util import (
    ExtraEngine,
    init_swarm,
    start_extra_engine,
    stop_extra_engine,
    write_echo_pod,
)
from fakes import ISSUE_URL
from kernel_util import KernelSession, outputs, text_of
from test_kernel_magics import first_display, update_with

from cldpd_magic.engines.multi import MultiEngineRunner

pytestmark = [pytest.mark.docker, pytest.mark.kernel, pytest.mark.timeout(300)]


@pytest.fixture(scope="module", params=["tls", "swarm"])
def far(request, docker_client) -> Iterator[tuple[str, ExtraEngine]]:
    """An engines entry for a second dockerd, as a plain engine or as a swarm's manager."""
    engine = start_extra_engine()
    try:
        if request.param == "swarm":
            init_swarm(engine)
            yield f"swarm://{engine.url}?tls={engine.certs}&name=far", engine
        else:
            yield f"{engine.url}?tls={engine.certs}&name=far", engine
    finally:
        stop_extra_engine(engine)


def _texts(msgs: list) -> str:
    return "\n".join(text_of(m) for m in outputs(msgs))


def test_a_run_on_another_engine_from_a_new_kernel(far, tmp_path: Path):
    entry, _ = far
    write_echo_pod(tmp_path / "pods", "far", {"keepAlive": True})
    env: dict[str, str | None] = {
        "CLDPD_ENGINES": entry,
        "CLDPD_PODS_DIR": str(tmp_path / "pods"),
        "CLDPD_SESSIONS_DIR": str(tmp_path / "sessions"),
    }
    setup = "%load_ext cldpd_magic\n%config CldpdMagics.flush_interval = 0.1"
    runner = MultiEngineRunner.from_settings([entry])
    assert runner is not None
    try:
        with KernelSession(env=env) as first:
            first.execute(setup)
            shown = _texts(first.execute(f"%cldpd_start far {ISSUE_URL}", timeout=180))
            assert "agent ran with -p --session-id" in shown, shown
        # The first kernel is gone; the kept-alive run waits on the far engine.
        with KernelSession(env=env) as second:
            second.execute(setup)
            listed = _texts(second.execute("%cldpd_sessions"))
            assert "cldpd-far" in listed and "far" in listed, listed
            mark = len(second.messages)
            did = first_display(second.execute("%cldpd_attach -b far"))
            # The agent of a kept-alive pod runs through exec: the attach says where it went.
            second.wait_for(update_with(did, "resume it to run the agent here"), since=mark)
            resumed = _texts(second.execute("%cldpd_resume far go on", timeout=120))
            assert "agent ran with -p --resume" in resumed, resumed
            second.execute("%cldpd_stop far", timeout=60)
            second.wait_for(update_with(did, "far attach: stopped"), timeout=60, since=mark)
            assert "cldpd-far" not in _texts(second.execute("%cldpd_sessions"))
        assert runner.list("cldpd.pod=far") == []
    finally:
        runner.remove("cldpd-far")
