"""Figures of interactive runs: how fast a policy's decision reaches the agent, and what
streaming costs when the agent's stdin is attached and every line is followed for its
questions.

Both agents are stand-ins for Claude Code in streaming-input mode (``--input-format
stream-json``): they read the first message on stdin, as the CLI does, and speak its
protocol only as far as the figure needs.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
import uuid
from typing import Any

from cldpd_magic import Dispatcher, EventType, Pod
from cldpd_magic.runs.agent import agent_command

from .harness import ISSUE_URL, PADDING, Bench, Result, fmt, interleaved, median

#: Questions the latency figure's agent asks, one after the other.
REQUESTS = 100
#: Lines the streaming figure's agent prints.
STREAM_LINES = 200_000
#: The first message an interactive run's agent reads (the start prompt).
FIRST_MESSAGE = json.dumps({"type": "user", "message": {"role": "user", "content": "Go."},
                            "parent_tool_use_id": None, "session_id": "default"})  # fmt: skip

#: Asks BENCH_REQUESTS times whether a Bash call may run, each after the last answer, and
#: prints for each when it asked and when the answer was read (bash's microsecond clock,
#: in the container: the round trip through Docker, cldpd and the policy and back).
ASKING_AGENT = r"""#!/bin/bash
ask='{"type":"control_request","request_id":"bench-%d","request":{"subtype":"can_use_tool",'
ask+='"tool_name":"Bash","input":{"command":"touch f%d"},"tool_use_id":"t%d"}}\n'
IFS= read -r first || exit 1
for ((i = 1; i <= ${BENCH_REQUESTS:-100}; i++)); do
  t0=$EPOCHREALTIME
  printf "$ask" "$i" "$i" "$i"
  IFS= read -r answer || exit 2
  t1=$EPOCHREALTIME
  ok=wrong
  [[ $answer == *"\"bench-$i\""* && $answer == *'"allow"'* ]] && ok=ok
  printf 'bench-latency %d %s %s %s\n' "$i" "$t0" "$t1" "$ok"
done
echo '{"type":"result","subtype":"success","is_error":false,"num_turns":1,"result":"done"}'
echo '{"type":"system","subtype":"session_state_changed","state":"idle"}'
cat > /dev/null
"""
#: Reads the first message, prints BENCH_LINES lines, ends its turn and waits for the end
#: of its input, as the CLI does when nothing more is sent.
STREAMING_AGENT = f"""#!/bin/sh
read -r first
seq 1 "${{BENCH_LINES:-1}}" | sed 's/$/{PADDING}/'
echo '{{"type":"result","subtype":"success","is_error":false,"num_turns":1,"result":"done"}}'
echo '{{"type":"system","subtype":"session_state_changed","state":"idle"}}'
cat > /dev/null
"""


def _write_pod(bench: Bench, tag: str, base: str, script: str, env: dict[str, str]) -> Pod:
    """An interactive bench pod: ``claude`` is ``script`` on ``base``; built now."""
    directory = bench.pods_dir / f"{bench.prefix}-{tag}"
    directory.mkdir()
    (directory / "Dockerfile").write_text(
        f"FROM {base}\nCOPY claude /usr/local/bin/claude\nRUN chmod +x /usr/local/bin/claude\n"
    )
    (directory / "claude").write_text(script)
    (directory / "pod.json").write_text(json.dumps({"interactive": True, "env": env}))
    pod = bench.dispatcher.pod(directory.name)
    bench.dispatcher.runner.build(pod.image, str(pod.dir), pod.config.build_args)
    return pod


def _cli_command(bench: Bench, pod: Pod, count: int) -> list[str]:
    """``docker run -i`` of the pod's interactive agent command, as the dispatcher runs it."""
    env = [a for k, v in pod.config.env.items() for a in ("-e", f"{k}={v}")]
    cmd = agent_command(pod, "", session_uuid=str(uuid.uuid4()), resume=False, interactive=True)
    return ["docker", "run", "-i", "--rm", "--init", "--name",
            f"cldpd-{bench.prefix}-icli{count}", *env, pod.image, *cmd]  # fmt: skip


def _latencies(lines: list[str]) -> list[float]:
    """Seconds from each question to its answer, from the agent's ``bench-latency`` lines."""
    found = []
    for line in lines:
        parts = line.split()
        if len(parts) == 5 and parts[0] == "bench-latency":
            if parts[4] != "ok":
                raise RuntimeError(f"question {parts[1]} got another answer than its own")
            found.append(float(parts[3]) - float(parts[2]))
    return found


def _ours_latency(bench: Bench, pod: Pod) -> list[float]:
    """Every question of one run answered by a policy callable through cldpd."""
    dispatcher = Dispatcher(bench.pods_dir, bench.dispatcher.runner, bench.transcripts,
                            can_use_tool=lambda _run, _tool, _input: True)  # fmt: skip
    session = dispatcher.start_session(pod.name, ISSUE_URL)
    session.wait(600)
    lines = [e.data for e in session.events() if e.type is EventType.OUTPUT]
    session.transcript.unlink(missing_ok=True)
    found = _latencies(lines)
    if len(found) != REQUESTS:
        raise RuntimeError(f"{len(found)} of {REQUESTS} questions were answered")
    return found


def _cli_latency(bench: Bench, pod: Pod, count: int) -> list[float]:
    """The same questions answered by a host process reading ``docker run -i`` directly."""
    answer = {"type": "control_response",
              "response": {"subtype": "success", "response": {"behavior": "allow"}}}  # fmt: skip
    with subprocess.Popen(
        _cli_command(bench, pod, count), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, bufsize=1,
    ) as proc:  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(FIRST_MESSAGE + "\n")
        proc.stdin.flush()
        lines = []
        for line in proc.stdout:
            if line.startswith('{"type":"control_request"'):
                request_id = json.loads(line)["request_id"]
                answer["response"]["request_id"] = request_id
                proc.stdin.write(json.dumps(answer) + "\n")
                proc.stdin.flush()
            elif line.startswith('{"type":"result"'):
                proc.stdin.close()
            else:
                lines.append(line)
        proc.wait(60)
    return _latencies(lines)


def decision_latency(bench: Bench) -> list[Result]:
    """Figure 15: the CLI's can_use_tool line to the policy's answer on its stdin."""
    pod = _write_pod(bench, "asks", "cldpd-debian:bookworm", ASKING_AGENT,
                     {"BENCH_REQUESTS": str(REQUESTS)})  # fmt: skip
    counter = iter(range(1, 1000))
    ours, theirs = interleaved(
        max(1, bench.reps // 2),
        lambda: _ours_latency(bench, pod),
        lambda: _cli_latency(bench, pod, next(counter)),
    )
    samples = [s * 1000 for run in ours for s in run]  # milliseconds
    direct = [s * 1000 for run in theirs for s in run]
    p90 = statistics.quantiles(samples, n=10)[-1]
    ours_median, direct_median = median(samples), median(direct)
    return [
        Result("15", f"an approval decided by a policy callable: from the agent's can_use_tool "
               f"line to the answer read on its stdin, median of {len(samples)} questions "
               f"({len(ours)} run(s) of {REQUESTS})", ours_median, None, "ms", "< 50 ms",
               ours_median < 50,
               f"p90 {fmt(p90, 'ms')}, max {fmt(max(samples), 'ms')}; per run medians "
               f"{[fmt(median(r) * 1000, 'ms') for r in ours]}; timed in the container (bash's "
               "$EPOCHREALTIME): Docker's attach both ways, the session's reader, the "
               "policy's thread and the run's stdin pipe"),
        Result("15b", "the same questions answered by a host process reading docker run -i "
               "itself (the transport alone)", direct_median, None, "ms", "(info)", None,
               f"p90 {fmt(statistics.quantiles(direct, n=10)[-1], 'ms')}, max "
               f"{fmt(max(direct), 'ms')}; cldpd adds {fmt(ours_median - direct_median, 'ms')} "
               "at the median"),
    ]  # fmt: skip


def _time_ours(bench: Bench, pod: Pod) -> tuple[float, float]:
    total, cpu, writer, session = bench.timed_start(pod)
    if session.conversation is None:
        raise RuntimeError("the run was not interactive")
    bench.forget(session)
    if writer.lines != STREAM_LINES + 2:  # and the result and idle lines
        raise RuntimeError(f"start delivered {writer.lines:,} lines of {STREAM_LINES + 2:,}")
    return total, cpu


def _time_cli(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, input=FIRST_MESSAGE + "\n", text=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)  # fmt: skip
    return time.perf_counter() - started


def interactive_streaming(bench: Bench) -> list[Result]:
    """Figure 16: 200,000 lines from an interactive run against ``docker run -i``."""
    pod = _write_pod(bench, "istream", "busybox:latest", STREAMING_AGENT,
                     {"BENCH_LINES": str(STREAM_LINES)})  # fmt: skip
    counter = iter(range(1000, 2000))
    ours, theirs = interleaved(
        bench.reps,
        lambda: _time_ours(bench, pod),
        lambda: _time_cli(_cli_command(bench, pod, next(counter))),
    )
    totals, cpus = [t for t, _ in ours], [c for _, c in ours]
    total, base = median(totals), median(theirs)
    samples = ", ".join(fmt(v, "s") for v in totals)
    cli = ", ".join(fmt(v, "s") for v in theirs)
    return [
        Result("16", f"Dispatcher.start of an interactive run (stdin attached, the prompt "
               f"sent on it, every output line followed for questions), {STREAM_LINES:,} "
               "lines to a null writer vs docker run -i --rm --init < prompt > /dev/null",
               total, base, "s", "ratio <= 1.15", total / base <= 1.15,
               f"ours [{samples}], docker run -i [{cli}]; client CPU "
               f"{fmt(median(cpus), 's')} ({median(cpus) / STREAM_LINES * 1e6:.2f} µs a line)"),
    ]  # fmt: skip


__all__: list[Any] = ["decision_latency", "interactive_streaming"]
