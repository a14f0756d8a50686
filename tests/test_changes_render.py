"""Changes shown: the collapsed section, a file's diff, runs compared, the terminal text.

Every piece of HTML goes through the project's safety checker with the XSS corpus in
file names, contents and commit subjects, and through a seeded fuzzer (``CLDPD_FUZZ_SEED``,
at most ``CLDPD_FUZZ_EXAMPLES`` inputs and ``CLDPD_FUZZ_SECONDS`` seconds, which bound the
run and are never asserted). The checker's allow-list gains ``details``, ``summary`` and
``span`` here (inert elements the section is made of); their attributes are still checked.
"""

from __future__ import annotations

import os
import random
import re
import time

import pytest
from html_safety import PAYLOADS, html_problems

from cldpd_magic.render import diff as view
from cldpd_magic.render.tables import _TABLE_CSS
from cldpd_magic.runs.changes import Changes
from cldpd_magic.secrets import MASK, Masker

SEED = int(os.environ.get("CLDPD_FUZZ_SEED", "20261207"))
EXAMPLES = int(os.environ.get("CLDPD_FUZZ_EXAMPLES", "3000"))
SECONDS = float(os.environ.get("CLDPD_FUZZ_SECONDS", "10"))
CSS = (view.DIFF_CSS, _TABLE_CSS)
ESCAPE = re.compile(r"\x1b")


def added(path: str, lines: list[str], mode: str = "100644") -> str:
    body = "".join(f"+{line}\n" for line in lines)
    return (
        f"diff --git a/{path} b/{path}\nnew file mode {mode}\n--- /dev/null\n+++ b/{path}\n"
        f"@@ -0,0 +1,{len(lines)} @@\n{body}"
    )


def modified(path: str, old: str, new: str) -> str:
    return (
        f"diff --git a/{path} b/{path}\n--- a/{path}\n+++ b/{path}\n"
        f"@@ -1,2 +1,2 @@\n ctx\n-{old}\n+{new}\n"
    )


def everything(changes: Changes, mask: Masker | None = None) -> list[str]:
    """Every HTML the changes show as: the section, each file opened, compared to itself."""
    pages = [view.changes_html(changes, mask=mask), changes._repr_html_()]
    pages += [view.file_diff_html(changes, f.path, mask=mask) for f in changes.files[:20]]
    pages.append(view.compare_html({"one": changes, "two": changes}, mask=mask))
    return pages


def test_the_checker_sees_an_active_section():
    assert html_problems('<details ontoggle="window.pwned=1"><summary>x</summary></details>')
    assert html_problems("<details open><summary>x</summary></details>")  # no attribute either
    assert html_problems("<span style=color:red>x</span>")


@pytest.mark.parametrize("payload", PAYLOADS)
def test_every_payload_in_names_contents_and_commits_is_inert(payload):
    name = payload.replace("\n", " ")
    patch = added(name, [payload, payload + " more"]) + modified("b.txt", payload, name)
    patch += f"diff --git a/{name}.bin b/{name}.bin\nnew file mode 100644\n"
    patch += f"Binary files /dev/null and b/{name}.bin differ\n"
    changes = Changes.from_patch(patch, commits=[f"abc {payload}"], notes=[payload])
    for page in everything(changes):
        assert html_problems(page, CSS) == [], payload
    text = view.changes_text(changes, color=True)
    assert "\x1b]" not in text and "\x07" not in text  # only Pygments' own colours
    assert not ESCAPE.search(view.changes_text(changes))
    assert not ESCAPE.search(view.compare_text({"a": changes, "b": changes}))


def test_nul_invalid_utf8_and_terminal_escapes_are_shown_cleaned():
    patch = (
        b"diff --git a/x\x00y b/x\x00y\nnew file mode 100644\n--- /dev/null\n+++ b/x\x00y\n"
        b"@@ -0,0 +1,3 @@\n+caf\xe9 \xff\xfe\n+\x1b]0;title\x07\x1b[2Jclear\n+nul\x00here\n"
    )
    changes = Changes.from_patch(patch)
    assert [f.insertions for f in changes.files] == [3]
    pages = everything(changes)
    for page in pages:
        assert html_problems(page, CSS) == []
    for page in pages[:3]:  # the section, its _repr_html_, the file opened
        assert "\ufffd" in page and "clear" in page and "nulhere" in page
    assert changes.raw == patch  # what apply uses is untouched


def test_a_symlink_out_of_the_workdir_is_named_not_followed():
    changes = Changes.from_patch(added("link", ["/etc/passwd"], mode="120000"))
    page = view.changes_html(changes)
    assert "/etc/passwd" in page and "root:" not in page  # its target, as text


def test_a_100000_line_file_is_cut_with_a_count():
    changes = Changes.from_patch(added("big.txt", [f"line {i}" for i in range(100_000)]))
    section = view.changes_html(changes)
    assert "line 100" in section and "line 99999" not in section
    assert f"{100_000 + 5 - view.FILE_LINES:,} more lines" in section
    opened = view.file_diff_html(changes, "big.txt")
    assert f"{100_000 + 5 - view.OPEN_FILE_LINES:,} more lines" in opened
    text = view.changes_text(changes, max_lines=10)
    assert text.endswith(f"{100_000 + 5 - 10:,} more lines\n")


def test_10000_files_keep_the_section_bounded():
    patch = "".join(added(f"dir/f{i}.txt", [f"x{i}"]) for i in range(10_000))
    changes = Changes.from_patch(patch)
    section = view.changes_html(changes)
    assert section.count('class="cldpd-file"') == view.MAX_FILES
    assert f"and {10_000 - view.MAX_FILES:,} more files" in section
    assert section.count('class="cldpd-diff"') <= view.SECTION_LINES // 6 + 1
    assert html_problems(section, CSS) == []
    assert view.changes_summary(changes) == f"Changes: 10000 files, +10,000 {view.MINUS}0"


def test_the_section_summarises_and_highlights():
    changes = Changes.from_patch(modified("a.py", "x = 1", "x = 2") + added("n.py", ["y"]))
    section = view.changes_html(changes, title="run-7")
    assert f"run-7 · Changes: 2 files, +2 {view.MINUS}1" in section
    assert section.index("<details") < section.index("<summary>")  # collapsed (no open)
    assert '<span class="cldpd-gi">+x = 2' in section and '<span class="cldpd-gd">-x = 1' in section
    assert view.changes_summary(None) == "Changes: none captured"


def test_secrets_are_masked_in_every_view():
    secret = "sk-secret-abcdef123456"
    changes = Changes.from_patch(added(f"{secret}.env", [f"KEY={secret}"]), mask=Masker([secret]))
    masker = Masker([secret])
    for page in everything(changes, masker):
        assert secret not in page and MASK in page
    assert "contains a secret value" in view.changes_html(changes)
    assert secret not in view.changes_text(changes, color=True)
    plain = Changes.from_patch(added("k.env", [f"KEY={secret}"]))  # captured unmasked
    assert secret not in view.changes_html(plain, mask=masker)  # the view masks again


def test_runs_compared_file_by_run_and_versions():
    one = Changes.from_patch(modified("a.py", "x = 1", "x = 2") + added("only1.py", ["a"]))
    two = Changes.from_patch(modified("a.py", "x = 1", "x = 3") + added("only2.py", ["b", "c"]))
    table = view.compare_table({"run-1": one, "run-2": two})
    assert table.columns == ("file", "run-1", "run-2")
    assert table.rows[:3] == [
        ("a.py", f"+1 {view.MINUS}1", f"+1 {view.MINUS}1"),
        ("only1.py", f"+1 {view.MINUS}0", ""),
        ("only2.py", "", f"+2 {view.MINUS}0"),
    ]
    assert view.shared_files({"run-1": one, "run-2": two}) == ["a.py"]
    text = view.compare_text({"run-1": one, "run-2": two})
    assert "-x = 2" in text and "+x = 3" in text
    same = view.compare_text({"run-1": one, "run-3": one})
    assert "run-1 and run-3 made the same version of a.py" in same


def _mutations(rng: random.Random) -> str:
    base = modified("a.txt", "old", "new") + added("n.bin", ["x"])
    pieces = [base, *PAYLOADS, "diff --git ", "@@ -1,5 +1 @@\n", "\n+", "\n-", '"a/\\', "\\"]
    choice = rng.random()
    if choice < 0.3:
        return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
    if choice < 0.6:
        chars = list(base)
        for _ in range(rng.randint(1, 20)):
            chars.insert(rng.randrange(len(chars) + 1), chr(rng.randrange(0, 0x3000)))
        return "".join(chars)
    data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
    return "diff --git a/f b/f\n@@ -1 +1 @@\n" + data.decode("utf-8", "surrogateescape")


def test_fuzzed_patches_never_raise_and_render_inert():
    rng = random.Random(SEED)
    deadline = time.monotonic() + SECONDS
    for example in range(EXAMPLES):
        if time.monotonic() > deadline:
            break
        patch = _mutations(rng)
        try:
            changes = Changes.from_patch(patch, mask=Masker(["window"]))
            pages = [view.changes_html(changes), view.compare_html({"a": changes})]
            pages += [view.file_diff_html(changes, f.path) for f in changes.files[:3]]
            view.changes_text(changes, color=True)
        except Exception as exc:  # pragma: no cover - the message names the input
            pytest.fail(f"seed {SEED}, example {example}: {exc!r} on {patch!r}")
        for page in pages:
            assert html_problems(page, CSS) == [], (SEED, example, patch)
