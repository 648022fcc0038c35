"""The `dnet` command line: layer lists, and argument errors answered with a clean message."""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path

import pytest

from dnet.cli import main, parse_layers
from dnet.ring import auth


@pytest.mark.parametrize(("text", "layers"), [
    ("[0,1,2]", [0, 1, 2]),
    ("[0, 1, 2, 5]", [0, 1, 2, 5]),
    ("[7]", [7]),
    ("0-2,5", [0, 1, 2, 5]),
    ("0-17,36-53", [*range(18), *range(36, 54)]),
    ("0,1,2,5", [0, 1, 2, 5]),
    ("3", [3]),
    ("4-4", [4]),
    (" 0-2 , 5 ", [0, 1, 2, 5]),
    ("[5,1,3]", [1, 3, 5]),
    ("5,0-1", [0, 1, 5]),
])
def test_parse_layers(text: str, layers: list[int]) -> None:
    assert parse_layers(text) == layers


@pytest.mark.parametrize("text", [
    "",
    "   ",
    "[]",
    "[0,1",  # unterminated JSON
    "[0,1.5]",
    '["0","1"]',
    "[-1,0]",
    "[0,0]",  # repeated
    "0-2,2",  # repeated through a range
    "a-b",
    "1-",
    "-3",
    "0..3",
    "x",
    "0-2;5",
    "[[0,1]]",
    "{}",
])
def test_parse_layers_rejects_bad_input(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_layers(text)


def assert_clean(err: str) -> None:
    assert err.strip(), "no message for the user"
    assert "Traceback" not in err


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run `dnet ...` in-process; returns (exit status, stderr). Restores signal handlers."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            status = main(argv)
        except SystemExit as exc:  # argparse errors
            status = exc.code if isinstance(exc.code, int) else 1
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        auth.configure(None)  # main() set this process's cluster key
    return status, capsys.readouterr().err


def shard_argv(model: str, *extra: str, layers: str = "0-3") -> list[str]:
    return ["shard", "-m", model, "-p", "0", "-l", layers, "-n", "127.0.0.1:9", "--host",
            "127.0.0.1", *extra]


def test_shard_with_a_missing_model_directory_fails_cleanly(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no-such-model"
    status, err = run_cli(shard_argv(str(missing)), capsys)
    assert status != 0
    assert_clean(err)
    assert "no-such-model" in err


def test_shard_with_a_directory_that_is_not_a_model_fails_cleanly(tmp_path: Path,
                                                                   capsys) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    status, err = run_cli(shard_argv(str(empty)), capsys)
    assert status != 0
    assert_clean(err)
    assert "config.json" in err


def test_api_with_a_missing_model_directory_fails_cleanly(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no-such-model"
    status, err = run_cli(["api", "-a", "127.0.0.1:0", "-s", "127.0.0.1:9", "-m", str(missing)],
                          capsys)
    assert status != 0
    assert_clean(err)
    assert "no-such-model" in err


def test_shard_with_layers_the_model_does_not_have_fails_cleanly(qwen3_model: Path,
                                                                  capsys) -> None:
    num_layers = json.loads((qwen3_model / "config.json").read_text())["num_hidden_layers"]
    status, err = run_cli(shard_argv(str(qwen3_model), layers=f"0-{num_layers + 3}"), capsys)
    assert status != 0
    assert_clean(err)


def test_shard_with_a_zero_prefetch_window_fails_cleanly(qwen3_model: Path, capsys) -> None:
    status, err = run_cli(shard_argv(str(qwen3_model), "--prefetch-window", "0"), capsys)
    assert status != 0
    assert_clean(err)
    assert "prefetch-window" in err


@pytest.mark.parametrize("argv", [
    ["shard", "-m", "x", "-p", "1", "-l", "zero-two", "-n", "127.0.0.1:9"],
    ["shard", "-m", "x", "-p", "1", "-l", "[0,0]", "-n", "127.0.0.1:9"],
    ["shard", "-m", "x", "-p", "not-a-port", "-l", "0-3", "-n", "127.0.0.1:9"],
    ["shard", "-m", "x", "-p", "1", "-l", "0-3"],  # no next hop
    ["shard", "-m", "x", "-p", "1", "-l", "0-3", "-n", "h:1", "--kv-ttl", "soon"],
    ["api", "-m", "x"],  # no first shard
    ["api", "-m", "x", "-s", "h:1", "--max-context", "lots"],
    ["no-such-command"],
    [],
], ids=["layer-words", "layer-repeated", "port", "no-next", "kv-ttl", "api-no-shard",
        "api-max-context", "unknown-command", "no-command"])
def test_argument_errors_exit_with_usage_not_traceback(argv: list[str], capsys) -> None:
    status, err = run_cli(argv, capsys)
    assert status == 2
    assert_clean(err)
    assert "usage:" in err


# ----- issue 14: host names, ports, limits, taken ports -------------------------------------


@pytest.mark.mdns
@pytest.mark.slow  # each browses real mDNS for 3 s
@pytest.mark.parametrize("command", [["status"], ["load", "some/model"], ["chat"]])
def test_host_localhost_is_accepted_by_the_client_commands(command: list[str], capsys,
                                                           monkeypatch) -> None:
    # Browsing loopback for a mesh under a key nobody uses: none answers, cleanly.
    monkeypatch.setenv("DNET_CLUSTER_KEY", "a key no mesh here uses")
    monkeypatch.delenv("DNET_API", raising=False)
    status, err = run_cli([*command, "--host", "localhost"], capsys)
    assert_clean(err)
    assert status == 1, err  # no node of that cluster answered; not a usage error, no crash
    assert "no dnet node of this cluster key answered over mDNS on 127.0.0.1" in err


@pytest.mark.parametrize("argv", [
    ["status", "--host", "no-such-host.invalid"],
    ["join", "--host", "no-such-host.invalid"],
    ["join", "--grpc-port", "0"],
    ["join", "--http-port", "70000"],
    ["join", "--http-port", "http"],
    ["join", "--context", "0"],
    ["join", "--max-requests", "-1"],
    ["join", "--kv-ttl", "0"],
    ["chat", "--max-tokens", "0"],
    ["api", "-m", "x", "-s", "h:1", "--token-timeout", "-5"],
], ids=["status-host", "join-host", "grpc-port-0", "http-port-70000", "http-port-word",
        "context-0", "max-requests-negative", "kv-ttl-0", "chat-max-tokens-0",
        "api-token-timeout"])
def test_usage_errors_exit_2_without_a_traceback(argv: list[str], capsys) -> None:
    status, err = run_cli(argv, capsys)
    assert status == 2
    assert_clean(err)
    assert "usage:" in err


def test_a_bad_port_in_the_environment_is_a_usage_error(capsys, monkeypatch) -> None:
    monkeypatch.setenv("DNET_HTTP_PORT", "eighty")
    status, err = run_cli(["join"], capsys)
    assert status == 2
    assert_clean(err)
    assert "eighty" in err


def test_host_errors_name_the_host(capsys) -> None:
    _, err = run_cli(["status", "--host", "no-such-host.invalid"], capsys)
    assert "cannot resolve host 'no-such-host.invalid'" in err


@pytest.fixture
def taken_port():
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def test_a_shard_on_a_taken_port_says_which_flag_to_change(qwen3_model: Path, taken_port: int,
                                                           capsys) -> None:
    status, err = run_cli(["shard", "-m", str(qwen3_model), "-p", str(taken_port), "-l", "0-3",
                           "-n", "127.0.0.1:9", "--host", "127.0.0.1"], capsys)
    assert status == 1
    assert err.strip() == (f"dnet shard: port {taken_port} is already in use; choose another "
                           "with -p/--port")


def test_an_api_on_a_taken_port_says_which_flag_to_change(qwen3_model: Path, taken_port: int,
                                                          capsys) -> None:
    status, err = run_cli(["api", "-a", f"localhost:{taken_port}", "-s", "127.0.0.1:9",
                           "-m", str(qwen3_model)], capsys)
    assert status == 1
    assert err.strip() == (f"dnet api: port {taken_port} is already in use; choose another "
                           "with -a/--address")


@pytest.mark.slow  # starts a Python process per command
@pytest.mark.parametrize("command", [["status", "--api", "127.0.0.1:9"],
                                     ["chat", "--api", "127.0.0.1:9"],
                                     ["load", "m", "--api", "127.0.0.1:9"]])
def test_the_client_commands_do_not_load_mlx(command: list[str]) -> None:
    import subprocess
    import sys

    code = ("import sys; from dnet.cli import main; main(sys.argv[1:]); "
            "print('MLX:', sorted(m for m in sys.modules if m.split('.')[0] in "
            "('mlx', 'mlx_lm')))")
    result = subprocess.run([sys.executable, "-c", code, *command], capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert "MLX: []" in result.stdout, result.stdout + result.stderr
