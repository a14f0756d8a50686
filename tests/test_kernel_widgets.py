"""The pod picker in a real kernel: the agent's lines reach its Output widget and nowhere else."""

from __future__ import annotations

import uuid

import pytest
from fakes import ISSUE_URL as URL
from kernel_util import KernelSession, outputs, text_of

pytestmark = pytest.mark.kernel


def test_agent_lines_go_to_the_pickers_output_only(docker_client, make_pod, pods_dir, tmp_path):
    mark = uuid.uuid4().hex[:12]
    name = make_pod(f'echo "first-{mark}"; sleep 1; echo "second-{mark}"; echo "third-{mark}"')
    with KernelSession(cwd=str(tmp_path)) as ks:
        setup = ks.execute(
            "from cldpd_magic import PodPicker\n"
            f"picker = PodPicker({str(pods_dir)!r}, interval=0.1)\n"
            "display(picker)\n"
            f"picker.pod_select.value = {name!r}\n"
            f"picker.issue_url.value = {URL!r}\n"
            "picker.start_button.click()\n"
            "print('model', picker.output.model_id)\n"
        )
        (printed,) = outputs(setup, ("stream",))
        model_id = text_of(printed).split()[1]
        ks.execute("print('another cell runs meanwhile')")
        final = ks.execute(
            "import time\n"
            "deadline = time.monotonic() + 90\n"
            f"while not picker.status.value.startswith({name + ': exited'!r}):\n"
            "    assert time.monotonic() < deadline, picker.status.value\n"
            "    time.sleep(0.05)\n"
            "print(picker.status.value)\n"
            "picker.join(10)\n",
            timeout=120,
        )
        assert text_of(outputs(final, ("stream",))[0]).startswith(f"{name}: exited 0")
        ks.drain()
    updates = [
        m
        for m in ks.messages
        if m["msg_type"] == "comm_msg"
        and m["content"]["comm_id"] == model_id
        and "outputs" in m["content"]["data"].get("state", {})
    ]
    shown = "\n".join(
        str(o.get("data", {})) for m in updates for o in m["content"]["data"]["state"]["outputs"]
    )
    for line in ("first", "second", "third"):
        assert f"{line}-{mark}" in shown
    assert len(updates) >= 2
    leaked = [m for m in outputs(ks.messages) if mark in text_of(m)]
    assert leaked == []
    others = [
        m
        for m in ks.messages
        if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] != model_id
    ]
    assert not any(mark in str(m["content"]) for m in others)
