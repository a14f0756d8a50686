"""A Swarm run's changes: captured on the task's node before its service is removed.

The swarm is a one-node swarm of a second dockerd (tests/test_swarm.py's fixture); the
run goes through the engines setting (``swarm://...``), as a user's would. It needs the
engines wiring that gives every runner ``capture`` (issue 22): until then it skips.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import write_pod
from test_swarm import swarm  # noqa: F401 - the fixture

from cldpd_magic.engines import MultiEngineRunner
from cldpd_magic.engines.swarm.runner import SwarmRunner
from cldpd_magic.runs import Dispatcher

pytestmark = [
    pytest.mark.docker,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        not hasattr(SwarmRunner, "capture"),
        reason="SwarmRunner reads no ended task container yet (the engines wiring of issue 22)",
    ),
]
URL = "https://github.com/octocat/Hello-World/issues/5"


def test_a_swarm_runs_changes_are_captured_on_its_node(swarm, tmp_path: Path):  # noqa: F811
    pod = write_pod(tmp_path / "pods", "changes", {"workdir": "/work"})
    (pod / "Dockerfile").write_text(
        "FROM busybox:latest\nWORKDIR /work\nRUN echo start > /work/a.txt\n"
        "COPY claude /usr/local/bin/claude\nRUN chmod +x /usr/local/bin/claude\n"
    )
    (pod / "claude").write_text("#!/bin/sh\necho more >> a.txt; echo new > b.txt; exit 4\n")
    runner = MultiEngineRunner.from_settings([swarm.entry])
    dispatcher = Dispatcher(tmp_path / "pods", runner, tmp_path / "sessions")
    session = dispatcher.start_session("changes", URL)
    swarm.made.append(session.container)
    assert session.wait(300) == 4
    changes = session.changes
    assert changes is not None
    assert {f.path: f.status for f in changes.files} == {"a.txt": "modified", "b.txt": "added"}
    assert "+more" in changes.diff("a.txt")
    assert swarm.api.services(filters={"label": "cldpd.pod=changes"}) == []
