"""The prefix cache's flags and their environment variables: defaults, values, usage errors."""

from __future__ import annotations

import pytest

from dnet.cli import build_parser
from dnet.entry import PREFILL_CHUNK
from tests.test_cli import assert_clean, run_cli


def test_defaults_and_values_from_flags_and_the_environment(monkeypatch) -> None:
    parser = build_parser()
    join = parser.parse_args(["join"])
    assert join.prefill_chunk == PREFILL_CHUNK and join.prefix_cache_bytes is None
    shard = parser.parse_args(["shard", "-m", "m", "-p", "1", "-l", "0-3", "-n", "h:2",
                               "--prefix-cache-bytes", "2GiB"])
    assert shard.prefix_cache_bytes == 2 << 30
    api = parser.parse_args(["api", "-m", "m", "-s", "h:1", "--prefill-chunk", "256"])
    assert api.prefill_chunk == 256
    monkeypatch.setenv("DNET_PREFIX_CACHE_BYTES", "0")
    monkeypatch.setenv("DNET_PREFILL_CHUNK", "128")
    join = build_parser().parse_args(["join"])
    assert join.prefix_cache_bytes == 0 and join.prefill_chunk == 128  # 0: off, not unset
    assert build_parser().parse_args(["join", "--prefill-chunk", "64"]).prefill_chunk == 64


@pytest.mark.parametrize("argv", [
    ["join", "--prefill-chunk", "0"],
    ["join", "--prefix-cache-bytes", "lots"],
    ["shard", "-m", "m", "-p", "1", "-l", "0", "-n", "h:2", "--prefix-cache-bytes", "-1GB"],
    ["api", "-m", "m", "-s", "h:1", "--prefill-chunk", "half"],
], ids=["chunk-0", "cache-word", "cache-negative", "chunk-word"])
def test_bad_values_are_usage_errors(argv: list[str], capsys) -> None:
    status, err = run_cli(argv, capsys)
    assert status == 2
    assert_clean(err)
    assert "usage:" in err


def test_a_bad_size_in_the_environment_is_a_usage_error(capsys, monkeypatch) -> None:
    monkeypatch.setenv("DNET_PREFIX_CACHE_BYTES", "a lot")
    status, err = run_cli(["join"], capsys)
    assert status == 2 and "a lot" in err
