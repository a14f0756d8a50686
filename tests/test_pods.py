"""Pod discovery: directories, pod.json, template.md and names (no Docker)."""

from __future__ import annotations

import os
import pathlib
import re
from pathlib import Path

import pytest
from fakes import write_pod

from cldpd_magic import (
    InvalidPodError,
    Mount,
    PodConfig,
    PodConfigError,
    PodNotFoundError,
    default_pods_dir,
    discover_all,
    discover_pod,
)
from cldpd_magic.pods import Resources, parse_memory, scan_pods
from cldpd_magic.pods.model import (
    IMAGE_REFERENCE_RE,
    MAX_POD_NAME_LENGTH,
    MAX_REPOSITORY_LENGTH,
)


def config_error(pods_dir: Path, pod_json: dict | str) -> str:
    write_pod(pods_dir, "p", pod_json)
    with pytest.raises(PodConfigError) as info:
        discover_pod(pods_dir, "p")
    message = str(info.value)
    assert str(pods_dir / "p" / "pod.json") in message
    return message


def test_pod_found_with_defaults(pods_dir):
    write_pod(pods_dir, "alpha")
    pod = discover_pod(pods_dir, "alpha")
    assert pod.name == "alpha"
    assert pod.dir == (pods_dir / "alpha").resolve()
    assert pod.dockerfile == pod.dir / "Dockerfile"
    assert pod.config == PodConfig()
    assert pod.template == ""
    assert pod.image == "cldpd-alpha"
    assert pod.container_name == "cldpd-alpha"


def test_pod_not_found(pods_dir):
    write_pod(pods_dir, "alpha")
    with pytest.raises(PodNotFoundError, match="'beta'"):
        discover_pod(pods_dir, "beta")


def test_pod_in_missing_pods_dir_is_not_found(tmp_path):
    with pytest.raises(PodNotFoundError):
        discover_pod(tmp_path / "nowhere", "alpha")


def test_regular_file_is_not_a_pod(pods_dir):
    (pods_dir / "file").write_text("x")
    with pytest.raises(PodNotFoundError):
        discover_pod(pods_dir, "file")


def test_pod_without_dockerfile_is_invalid(pods_dir):
    write_pod(pods_dir, "alpha", dockerfile=False)
    with pytest.raises(InvalidPodError, match="no Dockerfile"):
        discover_pod(pods_dir, "alpha")


def test_dockerfile_that_is_a_directory_is_invalid(pods_dir):
    pod = write_pod(pods_dir, "alpha", dockerfile=False)
    (pod / "Dockerfile").mkdir()
    with pytest.raises(InvalidPodError):
        discover_pod(pods_dir, "alpha")


def test_discover_all_sorted_skipping_files_and_dirs_without_dockerfile(pods_dir):
    for name in ("zeta", "alpha", "Mid", "beta"):
        write_pod(pods_dir, name)
    write_pod(pods_dir, "empty", dockerfile=False)
    (pods_dir / "README.md").write_text("not a pod")
    (pods_dir / "aaa-file").write_text("not a pod either")
    assert [p.name for p in discover_all(pods_dir)] == ["Mid", "alpha", "beta", "zeta"]


def test_discover_all_of_missing_dir_is_empty(tmp_path):
    assert discover_all(tmp_path / "nowhere") == []


def test_discover_all_raises_on_broken_pod_and_scan_lists_it(pods_dir):
    write_pod(pods_dir, "good")
    write_pod(pods_dir, "bad", "{nope")
    with pytest.raises(PodConfigError, match="malformed JSON"):
        discover_all(pods_dir)
    scanned = scan_pods(pods_dir)
    assert [name for name, _, _ in scanned] == ["bad", "good"]
    (_, bad_pod, bad_error), (_, good_pod, good_error) = scanned
    assert bad_pod is None and isinstance(bad_error, PodConfigError)
    assert good_pod is not None and good_pod.name == "good" and good_error is None


def test_default_image_tag_is_lower_cased(pods_dir):
    write_pod(pods_dir, "My_Pod.V2")
    assert discover_pod(pods_dir, "My_Pod.V2").image == "cldpd-my_pod.v2"


def test_default_image_tag_is_unique_per_name_among_case_twins(pods_dir):
    for name in ("my_pod.v2", "My_Pod.V2", "MY_POD.V2"):
        write_pod(pods_dir, name)
    images = [discover_pod(pods_dir, n).image for n in ("my_pod.v2", "My_Pod.V2", "MY_POD.V2")]
    assert images[0] == "cldpd-my_pod.v2"
    assert all(re.fullmatch(r"cldpd-my_pod\.v2-[0-9a-f]{8}", i) for i in images[1:])
    assert len(set(images)) == 3
    assert discover_pod(pods_dir, "My_Pod.V2").image == images[1]


@pytest.mark.parametrize("name", ["x-", "x.", "x_", "x._y", "x___y", "x-_y", "a" * 223])
def test_names_that_make_no_image_name_are_refused_up_front(pods_dir, name):
    with pytest.raises(InvalidPodError) as info:
        discover_pod(pods_dir, name)
    message = str(info.value)
    assert "\n" not in message and message.endswith(".")
    assert "image" in message


def test_longest_name_gives_a_valid_image_name(pods_dir):
    name = "A" * MAX_POD_NAME_LENGTH
    write_pod(pods_dir, name)
    image = discover_pod(pods_dir, name).image
    assert IMAGE_REFERENCE_RE.fullmatch(image) and len(image) <= MAX_REPOSITORY_LENGTH


def test_pods_whose_names_docker_refuses_are_listed_as_broken(pods_dir):
    write_pod(pods_dir, "x-")
    write_pod(pods_dir, "good")
    scanned = scan_pods(pods_dir)
    assert [(n, p is None, type(e).__name__) for n, p, e in scanned] == [
        ("good", False, "NoneType"),
        ("x-", True, "InvalidPodError"),
    ]


@pytest.mark.parametrize(
    "image", ["Upper", "a-", "a..b", "a:b:c", "with space", "a" * 238, "a/", "", "a@sha256:12"]
)
def test_image_that_is_no_docker_reference_is_one_sentence(pods_dir, image):
    message = config_error(pods_dir, {"image": image})
    assert "'image' must be a Docker image reference" in message and "\n" not in message


@pytest.mark.parametrize(
    "image", ["a", "a:1.0", "localhost:5000/team/a_b:v1", "a@sha256:" + "0" * 64, "a" * 237]
)
def test_valid_image_references_are_accepted(pods_dir, image):
    write_pod(pods_dir, "p", {"image": image})
    assert discover_pod(pods_dir, "p").image == image


def test_duplicate_keys_are_named(pods_dir):
    message = config_error(pods_dir, '{"env": {"A": "1", "A": "2"}, "image": "x"}')
    assert "'A' appears more than once" in message


def test_deeply_nested_pod_json_is_one_sentence_and_others_still_list(pods_dir):
    write_pod(pods_dir, "deep", '{"env": ' + "[" * 200_000 + "]" * 200_000 + "}")
    write_pod(pods_dir, "fine")
    with pytest.raises(PodConfigError, match="nested too deeply") as info:
        discover_pod(pods_dir, "deep")
    assert "\n" not in str(info.value)
    assert [(n, p is not None) for n, p, _ in scan_pods(pods_dir)] == [
        ("deep", False),
        ("fine", True),
    ]


def test_custom_image_is_used_verbatim(pods_dir):
    write_pod(pods_dir, "alpha", {"image": "registry.local/team/agent:1.2"})
    assert discover_pod(pods_dir, "alpha").image == "registry.local/team/agent:1.2"


def test_every_pod_json_key_is_parsed(pods_dir, tmp_path):
    source = tmp_path / "src"
    write_pod(
        pods_dir,
        "alpha",
        {
            "image": "my-image",
            "env": {"MODE": "fast", "EMPTY": ""},
            "buildArgs": {"VERSION": "1.0"},
            "workdir": "/work",
            "inheritEnv": ["HOST_A", "HOST_B"],
            "mounts": [
                {"source": str(source), "target": "/src", "readOnly": True},
                {"source": "/data", "target": "/data"},
            ],
            "args": ["--model", "opus", "--max-turns", "3"],
            "keepAlive": True,
            "network": "host",
            "resources": {"cpus": 1.5, "memory": "2g", "pids": 256},
            "capAdd": ["CHOWN", "cap_net_bind_service"],
            "readOnlyRoot": True,
            "unsafe": ["network:host"],
        },
    )
    assert discover_pod(pods_dir, "alpha").config == PodConfig(
        image="my-image",
        env={"MODE": "fast", "EMPTY": ""},
        build_args={"VERSION": "1.0"},
        workdir="/work",
        inherit_env=("HOST_A", "HOST_B"),
        mounts=(Mount(str(source), "/src", True), Mount("/data", "/data", False)),
        args=("--model", "opus", "--max-turns", "3"),
        keep_alive=True,
        network="host",
        resources=Resources(cpus=1.5, memory=2 * 1024**3, pids=256),
        cap_add=("CHOWN", "NET_BIND_SERVICE"),
        read_only_root=True,
        unsafe=("network:host",),
        unsafe_warnings=(
            "unsafe: shares the host's network (the host's own network: every service of the "
            "host and its loopback)",
        ),
    )


@pytest.mark.parametrize("network", ["none", "host", "bridge", "team-net", "net_2.a"])
def test_network_modes_and_names_are_accepted(pods_dir, network):
    unsafe = ["network:host"] if network == "host" else []
    write_pod(pods_dir, "alpha", {"network": network, "unsafe": unsafe})
    assert discover_pod(pods_dir, "alpha").config.network == network


@pytest.mark.parametrize(
    ("network", "expected"),
    [
        ("", "Docker network"),
        ("-net", "Docker network"),
        ("a b", "Docker network"),
        (3, "network"),
        ({"deny": ["github.com"]}, "allow"),
    ],
)
def test_bad_network_values_are_one_sentence(pods_dir, network, expected):
    message = config_error(pods_dir, {"network": network})
    assert "'network'" in message and expected in message and "\n" not in message


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (7340032, 7340032),
        ("512m", 512 << 20),
        ("512M", 512 << 20),
        ("2g", 2 << 30),
        ("2GiB", 2 << 30),
        ("1.5g", 3 << 29),
        ("64 mb", 64 << 20),
        ("100000000", 100000000),
        ("8k", 8192),
        ("2 x", None),
        ("-1m", None),
        ("", None),
        (True, None),
        (1.5, None),
    ],
)
def test_memory_sizes_read_as_docker_does(text, size):
    assert parse_memory(text) == size


def test_resources_are_parsed_and_optional(pods_dir):
    write_pod(pods_dir, "alpha", {"resources": {"memory": 67108864}})
    assert discover_pod(pods_dir, "alpha").config.resources == Resources(memory=64 << 20)
    write_pod(pods_dir, "beta", {"resources": {"cpus": 2, "pids": 1}})
    assert discover_pod(pods_dir, "beta").config.resources == Resources(cpus=2.0, pids=1)
    assert discover_pod(pods_dir, "beta").config.resources.cpus == 2.0
    write_pod(pods_dir, "gamma", {"resources": {}})
    assert discover_pod(pods_dir, "gamma").config.resources == Resources()


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        ({"memory": "5m"}, "below Docker's minimum of 6 MiB"),
        ({"memory": 1000}, "below Docker's minimum of 6 MiB"),
        ({"memory": "lots"}, "resources.memory must be bytes or a size"),
        ({"memory": 1.5e9}, "resources.memory must be bytes or a size"),
        ({"memory": None}, "resources.memory must be bytes or a size"),
        ({"cpus": 0}, "resources.cpus must be a number of CPUs of at least 0.01"),
        ({"cpus": -1}, "resources.cpus"),
        ({"cpus": "2"}, "resources.cpus"),
        ({"cpus": True}, "resources.cpus"),
        ({"cpus": 1e999}, "resources.cpus"),
        ({"pids": 0}, "resources.pids must be a whole number of processes of at least 1"),
        ({"pids": 2.5}, "resources.pids"),
        ({"pids": "100"}, "resources.pids"),
        ({"pids": False}, "resources.pids"),
        ({"swap": "1g"}, "unknown key 'swap' in resources; expected cpus, memory, pids"),
    ],
)
def test_bad_resources_are_one_sentence(pods_dir, resources, expected):
    message = config_error(pods_dir, {"resources": resources})
    assert expected in message and "\n" not in message


def test_capabilities_with_or_without_prefix_in_any_case(pods_dir):
    unsafe = ["cap:NET_ADMIN", "cap:sys_ptrace"]
    write_pod(
        pods_dir,
        "alpha",
        {"capAdd": ["CAP_CHOWN", "net_admin", "CHOWN", "Sys_Ptrace"], "unsafe": unsafe},
    )
    assert discover_pod(pods_dir, "alpha").config.cap_add == ("CHOWN", "NET_ADMIN", "SYS_PTRACE")


@pytest.mark.parametrize(
    ("cap", "expected"),
    [
        ("CAP_FLY", "capAdd[1] 'CAP_FLY' is not a Linux capability"),
        ("", "is not a Linux capability"),
        ("ALL", "'ALL', which would undo the capability drop"),
        ("cap_all", "'ALL', which would undo the capability drop"),
    ],
)
def test_unknown_capabilities_are_one_sentence(pods_dir, cap, expected):
    message = config_error(pods_dir, {"capAdd": ["CHOWN", cap]})
    assert expected in message and "\n" not in message


@pytest.mark.parametrize("text", ["", "  \n", "{}"])
def test_empty_pod_json_gives_defaults(pods_dir, text):
    write_pod(pods_dir, "alpha", text)
    assert discover_pod(pods_dir, "alpha").config == PodConfig()


def test_tilde_expands_to_home_in_mount_sources(pods_dir, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    mounts = [
        {"source": "~", "target": "/home"},
        {"source": "~/x/y", "target": "/x"},
    ]
    # The home directory itself holds the user's keys: a mount of it is waived on purpose.
    write_pod(pods_dir, "alpha", {"mounts": mounts, "unsafe": ["mount:~"]})
    got = discover_pod(pods_dir, "alpha").config.mounts
    assert [m.source for m in got] == [str(home), str(home / "x" / "y")]


@pytest.mark.parametrize("source", ["~root", "~root/x", "relative/dir", "./x", ""])
def test_mount_source_must_be_absolute_or_home(pods_dir, source):
    message = config_error(pods_dir, {"mounts": [{"source": source, "target": "/x"}]})
    assert "mounts[0].source" in message


@pytest.mark.parametrize(
    ("mount", "key"),
    [
        ({"source": "/a"}, "target"),
        ({"target": "/a"}, "source"),
        ({"source": "/a", "target": "rel"}, "mounts[0].target"),
        ({"source": "/a", "target": "/a", "ro": True}, "ro"),
        ({"source": "/a", "target": "/a", "readOnly": "yes"}, "mounts[0].readOnly"),
        ({"source": 1, "target": "/a"}, "mounts[0].source"),
        ("/a:/a", "mounts[0]"),
    ],
)
def test_bad_mounts_are_refused(pods_dir, mount, key):
    assert key in config_error(pods_dir, {"mounts": [mount]})


def test_malformed_json_names_line_and_column(pods_dir):
    message = config_error(pods_dir, '{\n  "image": "x",\n  "env": {"A": "b",}\n}\n')
    assert "line 3, column 20" in message


def test_unknown_key_is_named(pods_dir):
    message = config_error(pods_dir, {"image": "x", "keep_alive": True})
    assert "'keep_alive'" in message
    assert "keepAlive" in message


@pytest.mark.parametrize(
    ("pod_json", "key"),
    [
        ({"image": 3}, "image"),
        ({"workdir": ["/w"]}, "workdir"),
        ({"env": ["A=b"]}, "env"),
        ({"env": {"A": 1}}, "env.A"),
        ({"buildArgs": "A=b"}, "buildArgs"),
        ({"buildArgs": {"A": None}}, "buildArgs.A"),
        ({"inheritEnv": "HOME"}, "inheritEnv"),
        ({"inheritEnv": ["HOME", 1]}, "inheritEnv[1]"),
        ({"mounts": {"source": "/a"}}, "mounts"),
        ({"args": "--model opus"}, "args"),
        ({"args": ["--max-turns", 3]}, "args[1]"),
        ({"keepAlive": "true"}, "keepAlive"),
        ({"keepAlive": 1}, "keepAlive"),
        ({"readOnlyRoot": "yes"}, "readOnlyRoot"),
        ({"capAdd": "CHOWN"}, "capAdd"),
        ({"capAdd": [7]}, "capAdd[0]"),
        ({"resources": [1]}, "resources"),
        ([], "pod.json"),
    ],
)
def test_wrong_types_are_named(pods_dir, pod_json, key):
    assert key in config_error(pods_dir, pod_json)


@pytest.mark.parametrize(
    "name", ["API_KEY", "GITHUB_TOKEN", "client_secret", "DB_PASSWORD", "AWS_CREDENTIALS"]
)
def test_secret_looking_build_args_are_refused(pods_dir, name):
    message = config_error(pods_dir, {"buildArgs": {"VERSION": "1", name: "hunter22"}})
    assert f"buildArgs.{name}" in message
    assert "hunter22" not in message


def test_secret_looking_env_values_are_secret_values(pods_dir):
    write_pod(pods_dir, "alpha", {"env": {"API_KEY": "k-123456", "MODE": "plain", "TOKEN": ""}})
    assert discover_pod(pods_dir, "alpha").secret_values() == ["k-123456"]


def test_forwarded_values_are_secret_values(pods_dir):
    write_pod(pods_dir, "alpha", {"env": {"MODE": "plain"}, "inheritEnv": ["HOST_A", "GONE"]})
    pod = discover_pod(pods_dir, "alpha")
    assert pod.secret_values({"HOST_A": "plain-but-forwarded", "OTHER": "x"}) == [
        "plain-but-forwarded"
    ]


@pytest.mark.parametrize(("text", "expected"), [(None, ""), ("", ""), ("\n  \n", "")])
def test_template_absent_or_empty(pods_dir, text, expected):
    write_pod(pods_dir, "alpha", template=text)
    assert discover_pod(pods_dir, "alpha").template == expected


def test_template_is_read(pods_dir):
    write_pod(pods_dir, "alpha", template="\nBe brief.\n\nUse tests.\n")
    assert discover_pod(pods_dir, "alpha").template == "Be brief.\n\nUse tests."


def test_template_that_is_a_directory_is_unreadable(pods_dir):
    pod = write_pod(pods_dir, "alpha")
    (pod / "template.md").mkdir()
    with pytest.raises(InvalidPodError, match=r"template\.md"):
        discover_pod(pods_dir, "alpha")


def test_template_that_is_not_utf8_is_unreadable(pods_dir):
    write_pod(pods_dir, "alpha", template=b"caf\xe9\xff\n")
    with pytest.raises(InvalidPodError, match=r"template\.md"):
        discover_pod(pods_dir, "alpha")


def test_pod_json_that_is_not_utf8_is_a_config_error(pods_dir):
    pod = write_pod(pods_dir, "alpha")
    (pod / "pod.json").write_bytes(b'{"image": "\xff"}')
    with pytest.raises(PodConfigError, match=r"pod\.json"):
        discover_pod(pods_dir, "alpha")


BAD_NAMES = ["..", ".", "a/b", "../x", "../outside", ".hidden", "", "-x", "a b", "ok\n", "a\\b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_before_touching_files(tmp_path, name, monkeypatch):
    pods = tmp_path / "pods"
    write_pod(pods / "a", "b")
    write_pod(pods, ".hidden")
    write_pod(tmp_path, "outside")
    write_pod(tmp_path, "x")

    def touched(*args, **kwargs):
        raise AssertionError(f"the filesystem was touched for {name!r}")

    with monkeypatch.context() as patch:
        for method in ("stat", "is_dir", "is_file", "exists", "resolve", "read_text", "iterdir"):
            patch.setattr(pathlib.Path, method, touched)
        patch.setattr(os, "stat", touched)
        try:
            discover_pod(pods, name)
        except Exception as exc:
            error = exc
        else:
            error = None
    assert isinstance(error, InvalidPodError), repr(error)
    assert "not a valid pod name" in str(error)


@pytest.mark.parametrize("name", ["../outside", "a/b", ".hidden"])
def test_planted_pods_outside_are_never_found(tmp_path, name):
    pods = tmp_path / "pods"
    write_pod(pods / "a", "b")
    write_pod(pods, ".hidden")
    write_pod(tmp_path, "outside")
    with pytest.raises(InvalidPodError):
        discover_pod(pods, name)
    assert [p.name for p in discover_all(pods)] == []


def test_odd_but_valid_names(pods_dir):
    for name in ("a.b", "a_b-c", "9lives", "x..y"):
        write_pod(pods_dir, name)
    assert discover_pod(pods_dir, "a.b").name == "a.b"
    assert discover_pod(pods_dir, "9lives").image == "cldpd-9lives"
    with pytest.raises(InvalidPodError):
        discover_pod(pods_dir, "x..y")


def test_default_pods_dir_honours_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CLDPD_PODS_DIR", str(tmp_path / "elsewhere"))
    assert default_pods_dir() == tmp_path / "elsewhere"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CLDPD_PODS_DIR", "~/mine")
    assert default_pods_dir() == tmp_path / "home" / "mine"
    monkeypatch.delenv("CLDPD_PODS_DIR")
    assert default_pods_dir() == tmp_path / "home" / ".cldpd" / "pods"


@pytest.mark.parametrize("which", ["pod.json", "template.md"])
@pytest.mark.parametrize("kind", ["fifo", "device-link", "too-big"])
def test_pod_files_that_would_block_or_never_end_break_only_their_pod(pods_dir, which, kind):
    write_pod(pods_dir, "good")
    bad = write_pod(pods_dir, "bad") / which
    if kind == "fifo":
        os.mkfifo(bad)
    elif kind == "device-link":
        bad.symlink_to("/dev/zero")
    else:
        bad.write_bytes(b" " * (9 << 20))
    scanned = {name: (pod, error) for name, pod, error in scan_pods(pods_dir)}
    assert scanned["good"][0] is not None
    pod, error = scanned["bad"]
    assert pod is None and str(bad) in str(error) and "\n" not in str(error)


@pytest.mark.parametrize("workdir", ["relative/dir", "./x", "/x\u0000y"])
def test_workdir_must_be_an_absolute_container_path(pods_dir, workdir):
    assert "'workdir' must be an absolute path" in config_error(pods_dir, {"workdir": workdir})


@pytest.mark.parametrize("key", ["", "A=B", "A\u0000"])
def test_env_keys_must_be_variable_names(pods_dir, key):
    assert "no variable name" in config_error(pods_dir, {"env": {key: "x"}})


@pytest.mark.parametrize(
    ("pod_json", "named"),
    [
        ({"image": 3}, "got a number"),
        ({"image": None}, "got null"),
        ({"env": []}, "got an array"),
        ({"args": {}}, "got an object"),
        ({"args": [True]}, "got true or false"),
    ],
)
def test_type_errors_name_json_types(pods_dir, pod_json, named):
    message = config_error(pods_dir, pod_json)
    assert message.endswith(f"{named}.")
    assert not re.search(r"got (int|NoneType|list|dict|bool)\b", message)


def test_interactive_keys_parse_and_default():
    from cldpd_magic.pods import parse_pod_config

    path = Path("pods/p/pod.json")
    plain = parse_pod_config(path, "{}")
    assert (plain.interactive, plain.approval_timeout_seconds, plain.idle_timeout_seconds) == (
        False, 600.0, None)  # fmt: skip
    live = parse_pod_config(
        path, '{"interactive": true, "approvalTimeoutSeconds": 30, "idleTimeoutSeconds": 900}'
    )
    assert (live.interactive, live.approval_timeout_seconds, live.idle_timeout_seconds) == (
        True, 30.0, 900.0)  # fmt: skip
    for bad in ('{"interactive": "yes"}', '{"approvalTimeoutSeconds": 0}',
                '{"idleTimeoutSeconds": -1}'):  # fmt: skip
        with pytest.raises(PodConfigError) as info:
            parse_pod_config(path, bad)
        assert "\n" not in str(info.value)
