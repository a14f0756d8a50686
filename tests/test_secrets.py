"""What is secret and how it is masked (no Docker)."""

from __future__ import annotations

import json
import random

import pytest

from cldpd_magic.secrets import (
    MASK,
    Masker,
    config_secrets,
    container_secrets,
    forwarded_env,
    looks_secret,
)


@pytest.mark.parametrize(
    ("name", "secret"),
    [("API_KEY", True), ("github_token", True), ("DB_PASSWD", True), ("AWS_CREDENTIALS", True),
     ("client_secret", True), ("MODE", False), ("PATH", False), ("HOME", False)],
)  # fmt: skip
def test_looks_secret(name, secret):
    assert looks_secret(name) is secret


def test_config_secrets_are_secret_looking_env_values_and_every_forwarded_value():
    env = {"API_KEY": "k-123456", "MODE": "plain", "TOKEN": ""}
    environ = {"HOST_A": "forwarded-a", "HOST_EMPTY": "", "OTHER": "not-forwarded"}
    assert forwarded_env(["HOST_A", "HOST_EMPTY", "GONE"], environ) == {
        "HOST_A": "forwarded-a",
        "HOST_EMPTY": "",
    }
    assert config_secrets(env, ["HOST_A", "HOST_EMPTY", "GONE"], environ) == [
        "k-123456",
        "forwarded-a",
    ]


def test_container_secrets_are_what_the_container_was_given():
    env = {"FORWARDED": "given-elsewhere", "API_KEY": "key-5678", "MODE": "plain", "X_TOKEN": ""}
    assert container_secrets(env, ["FORWARDED", ""]) == ["given-elsewhere", "key-5678"]


def test_short_and_empty_values_are_not_masked():
    mask = Masker(["", "abc", "abcd"])
    assert mask("abc abcd") == f"abc {MASK}"
    assert not Masker(["", "ab"])
    assert Masker(["", "ab"])("ab \\u0061b") == "ab \\u0061b"


def test_longer_values_are_masked_first():
    assert Masker(["secret", "secret-longer"])("a secret-longer b") == f"a {MASK} b"


def encodings(secret: str, rng: random.Random) -> str:
    """The secret with each character written plainly or as one of its JSON/HTML escapes."""
    out = []
    for char in secret:
        code = ord(char)
        forms = [json.dumps(char)[1:-1], f"&#{code};", f"&#x{code:X};"]
        if code <= 0xFFFF:
            forms += [f"\\u{code:04x}", f"\\u{code:04X}"]
        if char not in '"\\':
            forms.append(char)
        if char == "/":
            forms.append("\\/")
        out.append(rng.choice(forms))
    return "".join(out)


@pytest.mark.parametrize("secret", ['pa"ss/wörd&<42>😀', "sk-ant-api03-AbC_dEf", "a\\b\nc\td"])
def test_every_encoding_of_every_character_is_masked(secret):
    rng = random.Random(secret)
    mask = Masker([secret])
    for _ in range(500):
        encoded = encodings(secret, rng)
        line = json.dumps({"type": "assistant"})[:-1] + f', "text": "<{encoded}>"}}'
        masked = mask(line)
        assert masked.endswith(f'"text": "<{MASK}>"}}'), (encoded, masked)


def test_text_without_a_secret_is_left_as_it_is():
    line = '{"text":"caf\\u00e9 \\n \\u0026 &amp; &#38; \\/ \\"quoted\\" done"}'
    assert Masker(["sk-ant-api03-AbC_dEf", 'pa"ss/wörd'])(line) == line


def test_json_twice_encoded_is_masked():
    secret = "s3cr3t&value"
    inner = json.dumps({"text": secret.replace("&", "\\u0026")})
    outer = json.dumps({"content": inner})
    assert "s3cr3t" not in Masker([secret])(outer)


@pytest.mark.parametrize(
    "split",
    [
        "super\x1b[0msecret1",  # a colour reset, raw
        "super\\u001b[0msecret1",  # the same as a JSON escape
        "super\\u001b[31;1msecret1",
        "super\x1b]0;title\x07secret1",  # a window title
        "supersec\rret1",  # a carriage return, raw
        "supersec\\rret1",  # and escaped
        "super\\u0007secret1",  # a bell
        "s\x00u\x08persecret1",  # NUL and backspace
    ],
)
def test_a_secret_split_by_what_a_terminal_drops_is_masked(split):
    masked = Masker(["supersecret1"])(f"before {split} after")
    assert masked == f"before {MASK} after"


def test_escape_sequences_without_a_secret_are_left_as_they_are():
    line = "\x1b[31mred\x1b[0m and \\u001b[1mbold\\u001b[0m \r\n"
    assert Masker(["supersecret1"])(line) == line


@pytest.mark.parametrize("secret", ['pa"ss/wörd&<42>😀', "sk-ant-api03-AbC_dEf", "supersecret1"])
def test_is_clean_says_false_for_every_line_that_masking_would_change(secret):
    # is_clean decides for many lines at once that none needs masking: a line that
    # masking changes must make it say False, whatever form the secret takes.
    rng = random.Random(secret)
    mask = Masker([secret])
    seen_clean = seen_dirty = 0
    for _ in range(400):
        lines = []
        for _ in range(rng.randint(1, 6)):
            form = rng.choice([
                encodings(secret, rng), secret, f"sup\x1b[0m{secret}", "plain words", "tab\there",
                '{"a":"caf\\u00e9"}', "x &amp; y", "a\\nb", "\x85", "",
            ])  # fmt: skip
            lines.append(f"<{form}>")
        text = "\n".join(lines)
        changed = any(mask(line) != line for line in lines)
        if mask.is_clean(text):
            seen_clean += 1
            assert not changed, lines
        else:
            seen_dirty += 1
    assert seen_clean and seen_dirty  # both answers came: the check can see either case


def test_is_clean_of_plain_text_and_without_secrets():
    plain = "\n".join(f"{n} abcdefghijklmnopqrstuvwxyz\twith a tab" for n in range(100))
    assert Masker(["supersecret1"]).is_clean(plain)
    assert Masker().is_clean("supersecret1 \x1b[0m")  # nothing to mask
    assert not Masker(["supersecret1"]).is_clean(plain + "\nsupersecret1")
    assert not Masker(["supersecret1"]).is_clean(plain + "\nsuper\rsecret1")
    assert not Masker(["supersecret1"]).is_clean(plain + "\n\x9b")  # a C1 control
