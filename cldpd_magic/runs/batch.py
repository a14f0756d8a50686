"""Batches: many runs of pods on issues, a few at a time, within a budget, as data.

:meth:`Dispatcher.dispatch <cldpd_magic.runs.Dispatcher.dispatch>` makes every run
of a batch at once, as a :class:`~cldpd_magic.runs.Session` whose job first waits in
the batch's queue; the queue lets runs go in order, at most ``max_parallel`` at once, and
none once the batch's cost has reached its budget (then the running ones stop too).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

from ..errors import CldpdError, InvalidRequestError
from ..events import RunState, Usage
from .agent import validate_issue_url
from .session import Session, SessionControl, SessionStopped, StopReason

__all__ = ["RESULT_KEYS", "Batch", "BatchAPI", "RunSpec", "Variant", "plan_batch"]

#: The keys of every record of :meth:`Batch.results`, in column order.
RESULT_KEYS = (
    "pod", "issue", "variant", "run", "state", "exit_code", "turns", "input_tokens",
    "output_tokens", "cost_usd", "seconds", "transcript", "links", "files_changed",
    "insertions", "deletions", "patch",
)  # fmt: skip

Job = Callable[[SessionControl], int]


class Variant(TypedDict, total=False):
    """One way to run each pod on each issue.

    Attributes:
        name: Names the variant in results ("v1", "v2", ... when absent).
        args: CLI arguments after the pod's own, such as ``["--model", "opus"]``.
        prompt: Text added after the start prompt.
    """

    name: str
    args: list[str]
    prompt: str


@dataclass
class RunSpec:
    """One run of a batch: which pod, on which issue, how.

    Attributes:
        pod: The pod.
        issue: The issue URL.
        variant: The variant's name ("" without variants).
        args: Extra CLI arguments.
        prompt: Text added after the start prompt.
        repeat: Which repeat this is (1 for the first).
    """

    pod: str
    issue: str
    variant: str = ""
    args: list[str] = field(default_factory=list)
    prompt: str = ""
    repeat: int = 1


def _names(what: str, value: str | Sequence[str]) -> list[str]:
    items = value.split() if isinstance(value, str) else list(value)
    if not items or not all(isinstance(i, str) and i.strip() for i in items):
        raise InvalidRequestError(f"Give at least one {what}, as a string or a list of strings.")
    return [i.strip() for i in items]


def _variants(variants: Sequence[Mapping[str, Any]] | None) -> list[tuple[str, list[str], str]]:
    if variants is None:
        return [("", [], "")]
    if isinstance(variants, str | Mapping) or not variants:
        raise InvalidRequestError(
            'variants must be a non-empty list of {"name", "args", "prompt"} objects.'
        )
    found, seen = [], set()
    for i, variant in enumerate(variants, 1):
        unknown = set(variant) - {"name", "args", "prompt"} if isinstance(variant, Mapping) else {0}
        if unknown:
            raise InvalidRequestError(
                f'Variant {i} must be an object with only "name", "args" and "prompt".'
            )
        name, args, prompt = (
            variant.get("name", f"v{i}"),
            variant.get("args", []),
            variant.get("prompt", ""),
        )
        if not isinstance(name, str) or not name.strip() or name in seen:
            raise InvalidRequestError(f"Variant {i} needs a name of its own, got {name!r}.")
        if isinstance(args, str) or not all(isinstance(a, str) for a in args):
            raise InvalidRequestError(f'Variant {name}: "args" must be a list of strings.')
        if not isinstance(prompt, str):
            raise InvalidRequestError(f'Variant {name}: "prompt" must be a string.')
        seen.add(name)
        found.append((name, list(args), prompt))
    return found


def _positive_int(what: str, value: object) -> int:
    """``value`` if it is a whole number of at least 1, else InvalidRequestError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequestError(f"{what} must be a whole number of at least 1, got {value!r}.")
    return value


def plan_batch(
    pods: str | Sequence[str],
    issues: str | Sequence[str],
    variants: Sequence[Mapping[str, Any]] | None = None,
    repeats: int = 1,
    max_parallel: int = 4,
    budget_usd: float | None = None,
) -> list[RunSpec]:
    """The runs of a batch, in the order they start: pods x issues x variants x repeats.

    Raises:
        InvalidRequestError: No pod or issue, a malformed variant, a count below 1 or a
            budget that is not a positive number.
    """
    pod_names = _names("pod", pods)
    urls = _names("issue URL", issues)
    ways = _variants(variants)
    _positive_int("repeats", repeats)
    _positive_int("max_parallel", max_parallel)
    if budget_usd is not None and (
        isinstance(budget_usd, bool)
        or not isinstance(budget_usd, int | float)
        or not math.isfinite(budget_usd)
        or budget_usd <= 0
    ):
        raise InvalidRequestError(
            f"budget_usd must be a number of dollars above 0, got {budget_usd!r}."
        )
    return [
        RunSpec(pod, url, name, args, prompt, repeat)
        for pod in pod_names
        for url in urls
        for name, args, prompt in ways
        for repeat in range(1, repeats + 1)
    ]


class Batch:
    """Runs of pods on issues, going a few at a time, as a list of sessions and as data.

    Iterating a batch gives its runs (:class:`Session`), in the order they start.

    Args:
        max_parallel: How many runs go at once.
        budget_usd: The budget of all runs together (None: none).

    Attributes:
        runs: The runs, one :class:`Session` each (a queued run's state is ``starting``).
        specs: What each run does, in the same order.
        max_parallel: How many runs go at once.
        budget_usd: The budget.
    """

    def __init__(self, max_parallel: int = 4, budget_usd: float | None = None) -> None:
        self.runs: list[Session] = []
        self.specs: list[RunSpec] = []
        self.max_parallel = max_parallel
        self.budget_usd = budget_usd
        self._cond = threading.Condition()
        self._open = False
        self._closed = False
        self._over_budget = False
        self._running: set[int] = set()  # indices whose job runs
        self._left: set[int] = set()  # indices out of the queue: admitted or never to be
        self._next = 0

    # --- the queue, used by the dispatcher ---------------------------------------------

    def queue(self, index: int) -> Callable[[Job], Job]:
        """Wrap run ``index``'s job so that it waits its turn in this batch's queue."""

        def wrap(job: Job) -> Job:
            def queued(ctl: SessionControl) -> int:
                self._enter(index, ctl)
                try:
                    return job(ctl)
                finally:
                    self._leave(index)

            return queued

        return wrap

    def add(self, spec: RunSpec, session: Session) -> None:
        """Add a run made by the dispatcher (in queue order)."""
        self.specs.append(spec)
        self.runs.append(session)
        session.add_usage_listener(self._on_usage)

    def open(self) -> None:
        """Let the queued runs start."""
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def _advance(self, index: int) -> None:
        self._left.add(index)
        while self._next in self._left:
            self._next += 1
        self._cond.notify_all()

    def _enter(self, index: int, ctl: SessionControl) -> None:
        with self._cond:
            while True:
                if ctl.cancelled.is_set() or self._closed:
                    self._advance(index)
                    self._mark_stopped(index, "")
                    raise SessionStopped("The run was stopped before its turn in the batch.")
                if self._over_budget or self._spent_all():
                    self._advance(index)
                    self._mark_stopped(index, StopReason.BATCH_BUDGET)
                    raise SessionStopped("The batch's budget was spent before this run's turn.")
                if self._open and index == self._next and len(self._running) < self.max_parallel:
                    self._running.add(index)
                    self._advance(index)
                    return
                # Woken by every change of the queue; the timeout also catches a run
                # stopped on its own (Session.stop does not know the queue).
                self._cond.wait(0.25)

    def _mark_stopped(self, index: int, reason: str) -> None:
        """A run leaving the queue unstarted ends STOPPED (with ``reason``), not failed."""
        if index < len(self.runs):
            self.runs[index].stop_for(reason)

    def _leave(self, index: int) -> None:
        with self._cond:
            self._running.discard(index)
            self._cond.notify_all()

    def _spent_all(self) -> bool:
        return self.budget_usd is not None and self.cost_usd >= self.budget_usd

    def _on_usage(self, _session: Session) -> None:
        if self._over_budget or not self._spent_all():
            return
        with self._cond:
            if self._over_budget:
                return
            self._over_budget = True
            # Runs whose agent has ended are left to finish as they did.
            going = [i for i in range(len(self.runs)) if i in self._running or i not in self._left]
            self._cond.notify_all()
        for index in going:
            self.runs[index].stop_for(StopReason.BATCH_BUDGET)

    # --- what users call -----------------------------------------------------------------

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self.runs))

    def __len__(self) -> int:
        return len(self.runs)

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for record in self.results():
            counts[record["state"]] = counts.get(record["state"], 0) + 1
        states = ", ".join(f"{n} {state}" for state, n in counts.items())
        return f"<Batch of {len(self.runs)} runs: {states or 'none'} · ${self.cost_usd:.4f}>"

    @property
    def done(self) -> bool:
        """Whether every run has ended."""
        return all(run.done for run in self.runs)

    @property
    def usage(self) -> Usage:
        """The usage of all runs together."""
        total = Usage()
        for run in list(self.runs):
            total = total + run.usage
        return total

    @property
    def cost_usd(self) -> float:
        """The cost of all runs together so far, in US dollars."""
        return sum(run.usage.cost_usd for run in list(self.runs))

    @property
    def over_budget(self) -> bool:
        """Whether the batch's budget was spent (no run starts any more)."""
        return self._over_budget

    def wait(self, timeout: float | None = None) -> Batch:
        """Wait for every run to end; a run's failure is in its result, not raised.

        Args:
            timeout: Seconds to wait in all; None waits for ever.

        Returns:
            The batch itself (``batch.wait().to_dataframe()``).

        Raises:
            TimeoutError: Some runs had not ended in time.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for run in list(self.runs):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                run.wait(left)
            except TimeoutError:
                pending = sum(1 for r in self.runs if not r.done)
                raise TimeoutError(
                    f"{pending} of the batch's {len(self.runs)} runs are still going."
                ) from None
            except Exception:  # the run's error is in its result
                pass
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every run gracefully, queued ones first (they never start); wait for them.

        Args:
            timeout: Seconds before a container is killed.
        """
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        runs = [run for run in self.runs if not run.done]
        stoppers = [
            threading.Thread(target=run.stop, args=(timeout,), daemon=True, name="cldpd-batch-stop")
            for run in runs
        ]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()

    def state_of(self, index: int) -> str:
        """Run ``index``'s state as results give it: ``queued``, a stop reason, or its state."""
        snap = self.runs[index].status.snapshot()
        with self._cond:
            queued = index not in self._left
        if queued and not snap.finished:
            return "queued"
        if snap.state is RunState.STOPPED and snap.reason:
            return snap.reason
        return str(snap.state)

    def results(self) -> list[dict[str, Any]]:
        """One record per run, with the keys of :data:`RESULT_KEYS`.

        ``state`` is ``queued``, ``building``, ``running``, ``exited``, ``failed``,
        ``stopped``, or why cldpd stopped the run: ``over budget`` (its pod's
        ``maxCostUsd``), ``max turns``, ``timed out`` or ``batch over budget``. Tokens and
        cost are the CLI's figures where it gave them; ``seconds`` is the agent's wall
        time; ``links`` are the pull request, branch and commit URLs the agent printed.
        ``files_changed``, ``insertions``, ``deletions`` and ``patch`` (its text, secrets
        masked) are the run's changes as last captured (None before any capture; a
        truncated capture has no patch).
        """
        records = []
        for index, (spec, run) in enumerate(zip(list(self.specs), list(self.runs), strict=True)):
            usage = run.usage
            snap = run.status.snapshot()
            changes = run.changes
            records.append({
                "pod": spec.pod,
                "issue": spec.issue,
                "variant": spec.variant,
                "run": run.run,
                "state": self.state_of(index),
                "exit_code": snap.exit_code,
                "turns": usage.turns,
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "cost_usd": usage.cost_usd,
                "seconds": round(snap.elapsed, 3),
                "transcript": str(run.transcript),
                "links": run.links,
                "files_changed": None if changes is None else changes.files_changed,
                "insertions": None if changes is None else changes.insertions,
                "deletions": None if changes is None else changes.deletions,
                "patch": None if changes is None or changes.truncated else changes.patch,
            })  # fmt: skip
        return records

    def to_dataframe(self) -> Any:
        """The results as a pandas DataFrame, one row per run.

        Raises:
            CldpdError: pandas is not installed.
        """
        try:
            import pandas
        except ImportError:
            raise CldpdError(
                "to_dataframe needs pandas, which is not installed; "
                "install it with: pip install 'cldpd_magic[pandas]'."
            ) from None
        return pandas.DataFrame(self.results(), columns=list(RESULT_KEYS))


class BatchAPI:
    """``dispatch``: batches of runs, over a class's pods, runner and ``start_session``.

    :class:`~cldpd_magic.runs.Dispatcher` has it.
    """

    runner: Any

    def pod(self, name: str) -> Any:
        """Discover one pod by name (the class provides it)."""
        raise NotImplementedError

    def start_session(self, pod_name: str, issue_url: str, **kwargs: Any) -> Session:
        """Start a run, returning at once (the class provides it)."""
        raise NotImplementedError

    def dispatch(
        self,
        pods: str | Sequence[str],
        issues: str | Sequence[str],
        *,
        variants: Sequence[Variant] | None = None,
        repeats: int = 1,
        max_parallel: int = 4,
        budget_usd: float | None = None,
        timeout: float | None = None,
    ) -> Batch:
        """Run pods x issues x variants x repeats, at most ``max_parallel`` at once.

        Every run is made at once, as a session that waits its turn (``starting``, queued)
        in order; its run name is ``<pod>-<issue number>`` (``-2``, ... for repeats and
        variants), or the pod's own when the batch has one run and the pod no other.

        Args:
            pods: A pod name or a list of them.
            issues: An issue URL or a list of them.
            variants: Ways to run each: ``{"name": str, "args": [str], "prompt": str}``
                (all optional): CLI arguments after the pod's, text after the prompt.
            repeats: How many runs of each pod, issue and variant.
            max_parallel: How many runs go at once; the rest wait.
            budget_usd: The batch's budget: once its runs together cost this much, no run
                starts and the running ones stop gracefully (``batch over budget``).
            timeout: Seconds each run's agent may run (over pod.json's
                ``timeoutSeconds``); a run past it stops gracefully (``timed out``).

        Returns:
            The :class:`Batch`, running.

        Raises:
            InvalidRequestError: No pod or issue, a bad URL, variant, count or budget.
            PodNotFoundError, InvalidPodError, PodConfigError: A pod is unusable.
            DockerUnavailableError: Docker does not answer.
        """
        plan = plan_batch(pods, issues, variants, repeats, max_parallel, budget_usd)
        for spec in plan:
            spec.issue = validate_issue_url(spec.issue)
            self.pod(spec.pod)
        self.runner.preflight()
        batch = Batch(max_parallel=max_parallel, budget_usd=budget_usd)
        alone = len(plan) == 1
        try:
            for index, spec in enumerate(plan):
                session = self.start_session(
                    spec.pod, spec.issue, args=spec.args, prompt=spec.prompt, timeout=timeout,
                    _wrap_job=batch.queue(index), _alone=alone,
                )  # fmt: skip
                batch.add(spec, session)
        except BaseException:
            batch.stop()
            raise
        batch.open()
        return batch
