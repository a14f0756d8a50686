"""Logging: swallowed errors reach the package's debug log, masked; off unless asked for."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import ISSUE_URL, FakeRunner, write_pod
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets import TraitError
from traitlets.config import Config

from cldpd_magic import BuildFailedError, Dispatcher, DockerUnavailableError
from cldpd_magic.cli import main
from cldpd_magic.logs import PACKAGE_LOGGER, log_swallowed
from cldpd_magic.render.stream import StreamRenderer
from cldpd_magic.secrets import Masker

SECRET = "s3cr3t-t0ken-value"


def debug_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured record as a handler would print it, tracebacks included."""
    formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    return "\n".join(formatter.format(r) for r in caplog.records)


def test_the_package_is_silent_by_default():
    logger = logging.getLogger(PACKAGE_LOGGER)
    assert any(isinstance(h, logging.NullHandler) for h in logger.handlers)
    assert logger.level == logging.NOTSET


def test_a_swallowed_error_is_logged_with_its_traceback_masked(caplog):
    logger = logging.getLogger(f"{PACKAGE_LOGGER}.test")
    caplog.set_level(logging.DEBUG, PACKAGE_LOGGER)
    try:
        raise ValueError(f"bad value {SECRET}")
    except ValueError:
        log_swallowed(logger, "parsing failed", Masker([SECRET]))
    (record,) = caplog.records
    assert (record.levelno, record.getMessage()) == (logging.DEBUG, "parsing failed")
    assert record.funcName == "test_a_swallowed_error_is_logged_with_its_traceback_masked"
    assert record.exc_info is None  # the live exception would print unmasked
    text = debug_text(caplog)
    assert "Traceback" in text and "ValueError: bad value ********" in text
    assert SECRET not in text


def test_nothing_is_formatted_when_debug_is_off(caplog):
    caplog.set_level(logging.INFO, PACKAGE_LOGGER)

    class Loud(Exception):
        def __str__(self) -> str:
            raise AssertionError("formatted although debug is off")

    try:
        raise Loud()
    except Loud:
        log_swallowed(logging.getLogger(f"{PACKAGE_LOGGER}.test"), "quiet")
    assert caplog.records == []


def test_the_renderer_logs_hostile_output_it_could_not_render(caplog, monkeypatch):
    caplog.set_level(logging.DEBUG, PACKAGE_LOGGER)
    renderer = StreamRenderer(Masker([SECRET]))

    def broken(event):
        raise KeyError(SECRET)  # as a renderer tripping over the line's content would

    monkeypatch.setattr(renderer, "render_event", broken)
    (line,) = renderer.render(json.dumps({"type": "assistant", "text": SECRET}))
    assert SECRET not in line.text
    text = debug_text(caplog)
    assert "cldpd_magic.render: rendering an output line failed" in text
    assert "KeyError: '********'" in text and SECRET not in text


def test_the_picker_logs_the_error_it_shows_as_a_sentence(caplog, monkeypatch, tmp_path):
    from cldpd_magic import PodPicker

    caplog.set_level(logging.DEBUG, PACKAGE_LOGGER)
    monkeypatch.setenv("GH_TOKEN", SECRET)
    pods_dir = tmp_path / "pods"
    write_pod(pods_dir, "p", {"inheritEnv": ["GH_TOKEN"]})
    runner = FakeRunner()
    runner.unavailable = DockerUnavailableError(f"Docker refused {SECRET}; start it.")
    dispatcher = Dispatcher(pods_dir, runner, transcript_dir=tmp_path / "sessions")
    picker = PodPicker(pods_dir=pods_dir, dispatcher=dispatcher)
    try:
        picker.issue_url.value = ISSUE_URL
        picker.start_button.click()
        assert picker.join(10)
        assert picker.status.value == "p: failed: Docker refused ********; start it."
    finally:
        picker.close()
    text = debug_text(caplog)
    assert "cldpd_magic.picker: pod p: no run started" in text
    assert "DockerUnavailableError: Docker refused ********; start it." in text
    assert SECRET not in text


# -- what the engines and the egress swallow ---------------------------------------------


class _NoBuilds:
    """An engine connection that has no image and drops every build request."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def control(self) -> _NoBuilds:
        return self

    def inspect_image(self, image: str) -> None:
        import docker.errors

        raise docker.errors.ImageNotFound(f"No such image: {image}")

    @contextlib.contextmanager
    def streaming(self) -> Iterator[None]:
        raise self.error
        yield


def test_a_dropped_build_logs_its_secret_build_args_masked(caplog, tmp_path):
    """Build args travel in the request's URL, which a dropped request's error holds."""
    import requests.exceptions

    from cldpd_magic.engines.docker import ImageBuilder

    caplog.set_level(logging.DEBUG, PACKAGE_LOGGER)
    value = f"{SECRET}/+"  # written %2F%2B in a URL
    args = {"API_TOKEN": value, "PLAIN": "plain-value"}
    query = urllib.parse.urlencode({"t": "cldpd-x", "buildargs": json.dumps(args)})
    url = f"/v1.41/build?{query}"
    assert urllib.parse.quote_plus(value) in url
    dropped = requests.exceptions.ConnectionError(f"Max retries exceeded with url: {url}")
    (tmp_path / "Dockerfile").write_text("FROM busybox:latest\n")
    builder = ImageBuilder(_NoBuilds(dropped), containers=None)  # type: ignore[arg-type]
    with pytest.raises(BuildFailedError) as failed:
        builder.build("cldpd-x", str(tmp_path), args)
    (record,) = caplog.records
    assert record.getMessage() == "build stream failed" and record.exc_info is None
    text = debug_text(caplog)
    # The control: the URL is in the log; only the secret's value is masked.
    assert "ConnectionError: Max retries exceeded" in text and "plain-value" in text
    assert SECRET not in text
    assert "plain-value" in str(failed.value) and SECRET not in str(failed.value)


class _ProxyLog:
    """A runner whose egress proxy logs a refused attempt, or whose log fails."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    def logs(self, container: str, stdout, stderr=None) -> int:
        if self.error is not None:
            raise self.error
        stdout.write(
            f"CLDPD-ACCESS {time.time() + 60:.3f} - TCP_DENIED 403 CONNECT x.example 443\n"
        )
        return 0

    def remove(self, container: str) -> None:
        pass


def test_the_egress_logs_what_it_swallows_with_its_keys_masked(caplog):
    from cldpd_magic.pods.policy import EgressPolicy
    from cldpd_magic.runs.egress import EgressGuard

    caplog.set_level(logging.DEBUG, PACKAGE_LOGGER)
    brokered = [("anthropic", SECRET, "https://api.anthropic.com")]

    def on_attempt(attempt) -> None:
        raise ValueError(f"the callback got {attempt.target} with {SECRET}")

    for runner in (_ProxyLog(), _ProxyLog(RuntimeError(f"the log broke at {SECRET}"))):
        guard = EgressGuard(runner, "cldpd-p", EgressPolicy(), brokered, on_attempt=on_attempt)
        guard.follow_existing()
        guard.remove()  # waits for the follower
    said = [(r.getMessage(), r.exc_info) for r in caplog.records]
    assert said == [
        ("egress attempt callback failed", None),
        ("following the egress log of cldpd-p failed", None),
    ]
    text = debug_text(caplog)
    assert "ValueError: the callback got x.example:443 with ********" in text
    assert "RuntimeError: the log broke at ********" in text
    assert SECRET not in text


@pytest.fixture
def ip(tmp_path: Path):
    config = Config()
    config.HistoryAccessor.enabled = False
    shell = InteractiveShell.instance(config=config)
    shell.config.CldpdMagics.pods_dir = str(tmp_path / "pods")
    shell.config.CldpdMagics.transcript_dir = str(tmp_path / "sessions")
    shell.extension_manager.load_extension("cldpd_magic")
    yield shell
    shell.extension_manager.unload_extension("cldpd_magic")
    del shell.config["CldpdMagics"]


def test_the_magics_log_the_error_behind_a_one_line_usage_error(ip, caplog, tmp_path):
    caplog.set_level(logging.DEBUG, PACKAGE_LOGGER)
    write_pod(tmp_path / "pods", "p")
    magics = ip.magics_manager.registry["CldpdMagics"]
    magics.runner = runner = FakeRunner()
    runner.unavailable = DockerUnavailableError("Docker is not reachable; start it.")
    with pytest.raises(UsageError, match=r"^Docker is not reachable; start it\.$"):
        ip.run_line_magic("cldpd_start", f"p {ISSUE_URL}")
    text = debug_text(caplog)
    assert "cldpd_magic.magics: a magic failed" in text
    assert "Traceback" in text and "DockerUnavailableError" in text


def test_log_level_trait_sends_the_log_to_the_kernel_process_stderr(ip, monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "__stderr__", stream)
    magics = ip.magics_manager.registry["CldpdMagics"]
    logger = logging.getLogger(PACKAGE_LOGGER)
    handlers = list(logger.handlers)
    ip.run_line_magic("config", 'CldpdMagics.log_level = "debug"')
    assert magics.log_level == "DEBUG"
    try:
        logging.getLogger(f"{PACKAGE_LOGGER}.test").debug("hello from the package")
        assert "DEBUG cldpd_magic.test: hello from the package" in stream.getvalue()
        with pytest.raises(TraitError):
            magics.log_level = "loud"
    finally:
        ip.run_line_magic("config", 'CldpdMagics.log_level = ""')
    assert logger.handlers == handlers and logger.level == logging.NOTSET
    logging.getLogger(f"{PACKAGE_LOGGER}.test").debug("not any more")
    assert "not any more" not in stream.getvalue()
    with capture_output() as captured:
        ip.run_line_magic("config", "CldpdMagics")
    assert "log_level" in captured.stdout


@pytest.mark.parametrize("how", ["env", "flag"])
def test_cldpd_logs_to_stderr_when_asked(how, monkeypatch, capsys, tmp_path):
    args = ["--pods-dir", str(tmp_path), "stop", "../x"]
    if how == "env":
        monkeypatch.setenv("CLDPD_LOG", "debug")
    else:
        args.insert(0, "--debug")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "DEBUG cldpd_magic.cli: cldpd stop failed" in err
    assert "Traceback" in err and "InvalidPodError" in err
    assert err.splitlines()[-1].startswith("cldpd: ") and "pod name" in err.splitlines()[-1]
    assert logging.getLogger(PACKAGE_LOGGER).level == logging.NOTSET


def test_cldpd_is_quiet_without_it_and_refuses_a_bad_level(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("CLDPD_LOG", raising=False)
    assert main(["--pods-dir", str(tmp_path), "stop", "../x"]) == 1
    err = capsys.readouterr().err
    assert "DEBUG" not in err and "Traceback" not in err
    monkeypatch.setenv("CLDPD_LOG", "loud")
    assert main(["--pods-dir", str(tmp_path), "list"]) == 2
    assert capsys.readouterr().err == (
        "cldpd: CLDPD_LOG: 'loud' is not a log level; use one of debug, info, warning, "
        "error, critical.\n"
    )
