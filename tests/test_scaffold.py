"""Pod templates and scaffolding: create_pod, ``cldpd init``, ``%cldpd_new``, empty pods dirs."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fakes import FakeRunner
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets.config import Config

import cldpd_magic
from cldpd_magic.errors import InvalidPodError, InvalidRequestError
from cldpd_magic.pods import discover_pod, scaffold
from cldpd_magic.pods.scaffold import TEMPLATES_DIR, create_pod, get_template, template_names

REPO = Path(__file__).resolve().parent.parent
CLDPD = [sys.executable, "-m", "cldpd_magic.cli"]
BAD_NAMES = ("../escape", "a/b", ".hidden", "-x", "", "a..b", "sp ace")


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root, by relative path, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def cldpd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLDPD, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


@pytest.fixture
def custom_templates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A templates folder of the test's own, in place of the package's."""
    root = tmp_path / "templates"
    root.mkdir()
    monkeypatch.setattr(scaffold, "TEMPLATES_DIR", root)
    return root


# -- the shipped templates ------------------------------------------------------------


def test_the_package_ships_the_minimal_and_claude_code_templates():
    assert cldpd_magic.create_pod is create_pod
    names = template_names()
    assert {"minimal", "claude-code"} <= set(names)
    assert names == sorted(names)
    assert scaffold.DEFAULT_TEMPLATE in names
    assert get_template("claude-code").summary == "a pod that runs the real Claude Code"


@pytest.mark.parametrize("template", template_names())
def test_every_template_writes_a_pod_that_loads(template, pods_dir):
    made = create_pod("mine", template, pods_dir)
    assert made.dir == pods_dir / "mine"
    assert tree(made.dir) == tree(TEMPLATES_DIR / template)
    assert made.files == tuple(sorted(tree(made.dir)))
    pod = discover_pod(pods_dir, "mine")
    assert pod.image == "cldpd-mine"
    assert made.next_steps, "every template says what to edit next"
    text = made.text("cldpd start mine --issue URL")
    assert text.splitlines()[0] == f"Created pod 'mine' from template '{template}' in {made.dir}:"
    assert text.endswith("Then start it: cldpd start mine --issue URL")


def test_next_steps_come_from_the_pod_json_and_dockerfile(pods_dir, monkeypatch):
    monkeypatch.delenv("GH_TOKEN", raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-not-shown")
    monkeypatch.setattr(os, "getuid", lambda: 4242)
    steps = "\n".join(create_pod("real", "claude-code", pods_dir).next_steps)
    assert "inheritEnv): set ANTHROPIC_API_KEY, GH_TOKEN where pods are started" in steps
    assert "(not set here: GH_TOKEN)" in steps
    assert "~/.ssh -> /home/agent/.ssh (read-only" in steps
    assert "AGENT_UID=1000 (your uid here is 4242" in steps
    assert "the Dockerfile also takes BASE_IMAGE, CLAUDE_CODE_VERSION" in steps
    assert "--permission-mode acceptEdits" in steps
    assert "template.md" in steps
    assert "sk-not-shown" not in steps


def test_a_template_of_ones_own_masks_secrets_and_flags_missing_mounts(
    custom_templates, pods_dir, tmp_path
):
    own = custom_templates / "own"
    (own / "sub").mkdir(parents=True)
    (own / "Dockerfile").write_text("FROM busybox\nARG FLAVOUR=plain\n")
    (own / "sub" / "tool.sh").write_text("echo hi\n")
    (own / "pod.json").write_text(
        json.dumps({
            "env": {"API_TOKEN": "hush-hush", "MODE": "fast"},
            "mounts": [{"source": str(tmp_path / "absent"), "target": "/src"}],
            "network": "none",
        })
    )  # fmt: skip
    made = create_pod("p", "own", pods_dir)
    assert made.files == ("Dockerfile", "pod.json", "sub/tool.sh")
    steps = "\n".join(made.next_steps)
    assert "API_TOKEN=***, MODE=fast" in steps
    assert "hush-hush" not in made.text()
    assert f"{tmp_path / 'absent'} -> /src (read-write, missing on this machine)" in steps
    assert "the Dockerfile takes FLAVOUR" in steps
    assert "network (pod.json network): none" in steps


def test_a_broken_template_pod_json_is_named_not_raised(custom_templates, pods_dir):
    (custom_templates / "broken").mkdir()
    (custom_templates / "broken" / "Dockerfile").write_text("FROM busybox\n")
    (custom_templates / "broken" / "pod.json").write_text("{nope")
    made = create_pod("p", "broken", pods_dir)
    assert made.next_steps[0].startswith("fix pod.json: ")
    assert "malformed JSON at line 1" in made.next_steps[0]


def test_a_directory_without_dockerfile_is_no_template(custom_templates):
    (custom_templates / "notes").mkdir()
    assert template_names() == []
    with pytest.raises(InvalidRequestError, match="templates are: none are installed"):
        get_template("notes")


# -- refusals ------------------------------------------------------------------------


def test_an_existing_pod_is_never_overwritten(pods_dir):
    existing = pods_dir / "taken"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(InvalidRequestError, match=r"taken already exists; choose another"):
        create_pod("taken", "minimal", pods_dir)
    assert tree(existing) == {"notes.txt": b"mine"}
    create_pod("twice", "minimal", pods_dir)
    (pods_dir / "twice" / "pod.json").write_text("{}")
    with pytest.raises(InvalidRequestError, match="already exists"):
        create_pod("twice", "claude-code", pods_dir)
    assert (pods_dir / "twice" / "pod.json").read_text() == "{}"


def test_a_file_or_dangling_link_of_that_name_is_refused_too(pods_dir, tmp_path):
    (pods_dir / "afile").write_text("x")
    (pods_dir / "alink").symlink_to(tmp_path / "nowhere")
    for name in ("afile", "alink"):
        with pytest.raises(InvalidRequestError, match="already exists"):
            create_pod(name, "minimal", pods_dir)
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_one_sentence_and_write_nothing(name, tmp_path):
    pods = tmp_path / "new-pods"
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(InvalidPodError, match="is not a valid pod name") as caught:
        create_pod(name, "minimal", pods)
    assert "\n" not in str(caught.value)
    assert sorted(tmp_path.rglob("*")) == before


def test_an_unknown_template_lists_the_known_ones(pods_dir):
    with pytest.raises(InvalidRequestError) as caught:
        create_pod("p", "nope", pods_dir)
    assert str(caught.value) == (
        f"No pod template named 'nope'; the templates are: {', '.join(template_names())}."
    )
    assert list(pods_dir.iterdir()) == []


def test_a_pods_dir_that_cannot_be_made_is_one_sentence(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(InvalidRequestError, match="Cannot make the pods directory") as caught:
        create_pod("p", "minimal", blocker / "pods")
    assert "\n" not in str(caught.value)


def test_a_failed_copy_leaves_no_half_written_pod(custom_templates, pods_dir, tmp_path):
    (custom_templates / "leaky").mkdir()
    (custom_templates / "leaky" / "Dockerfile").write_text("FROM busybox\n")
    (custom_templates / "leaky" / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(InvalidRequestError, match="Cannot write the pod into"):
        create_pod("p", "leaky", pods_dir)
    assert list(pods_dir.iterdir()) == []


def test_the_pods_dir_is_made_and_defaults_to_cldpd_pods_dir(tmp_path):
    made = create_pod("first")
    assert made.dir == tmp_path / "home-pods" / "first"
    assert made.template == "minimal"
    deep = create_pod("second", "minimal", tmp_path / "a" / "b")
    assert deep.dir.is_dir()


# -- one copy: the repository's example is the package's template ---------------------


def test_examples_claude_code_is_a_link_to_the_template_that_git_keeps():
    link = REPO / "examples" / "claude-code"
    assert link.is_symlink()
    assert not os.path.isabs(os.readlink(link))
    assert link.resolve() == (TEMPLATES_DIR / "claude-code").resolve()
    assert (REPO / "examples" / "pods" / "demo" / "Dockerfile").is_file()
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    staged = subprocess.run(
        ["git", "ls-files", "-s", "examples/claude-code"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert staged.startswith("120000 "), staged


# -- version -------------------------------------------------------------------------


def test_one_version_everywhere():
    assert cldpd_magic.__version__ == importlib.metadata.version("cldpd_magic")
    result = cldpd("--version")
    assert (result.returncode, result.stdout) == (0, f"cldpd {cldpd_magic.__version__}\n")


# -- cldpd init ----------------------------------------------------------------------


def test_cldpd_init_writes_a_pod_and_says_what_next(pods_dir, tmp_path):
    result = cldpd("init", "mine", "--template", "claude-code", "--pods-dir", str(pods_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Created pod 'mine' from template 'claude-code' in {pods_dir}")
    assert "Edit next:" in result.stdout
    assert f"Then start it: cldpd --pods-dir {pods_dir} start mine --issue URL" in result.stdout
    assert tree(pods_dir / "mine") == tree(TEMPLATES_DIR / "claude-code")
    plain = cldpd("--pods-dir", str(pods_dir), "init", "plain", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert "from template 'minimal'" in plain.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("init", "mine"), "already exists; choose another pod name"),
        (("init", "../up"), "'../up' is not a valid pod name"),
        (("init", "x", "--template", "nope"), "No pod template named 'nope'; the templates are"),
    ],
)
def test_cldpd_init_refusals_are_one_line(pods_dir, args, message):
    create_pod("mine", "minimal", pods_dir)
    result = cldpd("--pods-dir", str(pods_dir), *args)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("cldpd: ")
    assert message in result.stderr


@pytest.mark.docker
def test_cldpd_list_of_an_empty_pods_dir_says_how_to_make_a_pod(tmp_path, docker_client):
    missing = tmp_path / "no-pods-yet"
    result = cldpd("--pods-dir", str(missing), "list")
    assert result.returncode == 0, result.stderr
    # Pods of other directories that run (other tests') may follow in a table.
    assert result.stdout.splitlines()[0] == (
        f"No pods in {missing}: make one with `cldpd --pods-dir {missing} init NAME` "
        f"(templates: {', '.join(template_names())})."
    )


# -- %cldpd_new and %cldpd_pods --------------------------------------------------------


@pytest.fixture
def ip(pods_dir: Path, transcript_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The shell singleton with the extension loaded, pointed at tmp paths (cwd too)."""
    monkeypatch.chdir(tmp_path)
    config = Config()
    config.HistoryAccessor.enabled = False
    shell = InteractiveShell.instance(config=config)
    shell.config.CldpdMagics.pods_dir = str(pods_dir)
    shell.config.CldpdMagics.transcript_dir = str(transcript_dir)
    shell.extension_manager.load_extension("cldpd_magic")
    yield shell
    shell.extension_manager.unload_extension("cldpd_magic")
    del shell.config["CldpdMagics"]


def test_cldpd_new_writes_into_the_configured_pods_dir(ip, pods_dir):
    with capture_output() as captured:
        result = ip.run_line_magic("cldpd_new", "fresh --template claude-code")
    assert result is None
    assert captured.stdout.startswith(
        f"Created pod 'fresh' from template 'claude-code' in {pods_dir}"
    )
    assert "Then start it: %cldpd_start fresh ISSUE_URL" in captured.stdout
    assert tree(pods_dir / "fresh") == tree(TEMPLATES_DIR / "claude-code")
    assert [r["pod"] for r in ip.run_line_magic("cldpd_pods", "").records()] == ["fresh"]


def test_cldpd_new_with_its_own_pods_dir(ip, tmp_path):
    other = tmp_path / "other pods"
    with capture_output() as captured:
        ip.run_line_magic("cldpd_new", f"p1 --pods-dir '{other}'")
    assert (other / "p1" / "Dockerfile").is_file()
    assert f"%cldpd_start --pods-dir '{other}' p1 ISSUE_URL" in captured.stdout
    assert list(tmp_path.glob("'*")) == []


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("../up", "'../up' is not a valid pod name"),
        ("p --template nope", "No pod template named 'nope'; the templates are: "),
        ("", "required"),
        ("p 'unbalanced", "check the quotes"),
    ],
)
def test_cldpd_new_bad_input_is_a_usage_error(ip, pods_dir, line, message):
    with pytest.raises(UsageError, match=message) as caught:
        ip.run_line_magic("cldpd_new", line)
    assert "\n" not in str(caught.value)
    assert list(pods_dir.iterdir()) == []


def test_cldpd_new_refuses_to_overwrite(ip, pods_dir):
    with capture_output():
        ip.run_line_magic("cldpd_new", "once")
    with pytest.raises(UsageError, match="once already exists"):
        ip.run_line_magic("cldpd_new", "once --template claude-code")
    assert tree(pods_dir / "once") == tree(TEMPLATES_DIR / "minimal")


def test_cldpd_new_has_help_and_goes_with_the_extension(ip):
    with capture_output() as captured:
        ip.run_cell("%cldpd_new?")
    assert "%cldpd_new" in captured.stdout
    assert "--template" in captured.stdout
    ip.extension_manager.unload_extension("cldpd_magic")
    try:
        assert ip.find_line_magic("cldpd_new") is None
    finally:
        ip.extension_manager.load_extension("cldpd_magic")
    assert ip.find_line_magic("cldpd_new") is not None


def test_cldpd_pods_of_an_empty_pods_dir_says_how_to_make_one(ip, pods_dir):
    ip.magics_manager.registry["CldpdMagics"].runner = FakeRunner()
    table = ip.run_line_magic("cldpd_pods", "")
    assert len(table) == 0
    assert f"No pods in {pods_dir}: make one with %cldpd_new NAME (templates: " in table.text()
    assert "%cldpd_new NAME" in table._repr_html_()
