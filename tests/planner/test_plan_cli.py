"""`dnet plan`, driven through add_plan_arguments / run_plan as the CLI wires them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlx.core as mx
import pytest

from dnet.model_facts import profile_model
from dnet.plan_cli import add_plan_arguments, run_plan
from planner import DEFAULT_RESERVE_BYTES, load_devices_json
from tests.planner.model_files import QWEN3_CONFIG, write_model

REPO_ROOT = Path(__file__).resolve().parents[2]


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dnet plan")
    add_plan_arguments(parser)
    return run_plan(parser.parse_args(argv))


def model_bytes(model_dir: Path) -> int:
    return profile_model(model_dir).total_bytes


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cli") / "tiny-qwen3"
    write_model(directory, QWEN3_CONFIG, mx.bfloat16, files=2)
    return directory


def write_devices(path: Path, budgets: list[int]) -> Path:
    path.write_text(
        json.dumps(
            [
                {
                    "id": f"mac-{chr(ord('a') + index)}",
                    "memory_budget_bytes": budget,
                    "flops": 2.0e12,
                    "disk_read_bytes_per_s": 3.0e9,
                    "latency_ms": 2.0,
                }
                for index, budget in enumerate(budgets)
            ]
        )
    )
    return path


def test_prints_a_table(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    size = model_bytes(model_dir)
    devices = write_devices(tmp_path / "devices.json", [size // 2, size // 2])
    code = run(
        [
            "--model",
            str(model_dir),
            "--devices",
            str(devices),
            "--reserve-bytes",
            "0",
            "--context",
            "16",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "mac-a" in out and "ms/token" in out and "window" in out


def test_json_output(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    size = model_bytes(model_dir)
    devices = write_devices(tmp_path / "devices.json", [2 * size // 3, 2 * size // 3])
    code = run(
        [
            "--model",
            str(model_dir),
            "--devices",
            str(devices),
            "--reserve-bytes",
            "0",
            "--context",
            "16",
            "--json",
        ]
    )
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"ring", "rounds", "predicted_ms_per_token", "devices"} <= set(plan)
    layers = sorted(layer for entry in plan["devices"] for layer in entry["layers"])
    assert layers == list(range(QWEN3_CONFIG["num_hidden_layers"]))
    assert plan["options"]["context_tokens"] == 16


def test_window_covers_run_flag(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    devices = write_devices(tmp_path / "devices.json", [model_bytes(model_dir) // 2])
    code = run(
        [
            "--model",
            str(model_dir),
            "--devices",
            str(devices),
            "--reserve-bytes",
            "0",
            "--context",
            "0",
            "--window-covers-run",
            "--json",
        ]
    )
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["options"]["window_covers_run"] is True
    (member,) = plan["devices"]
    assert member["layers_per_round"] <= member["window"]


def test_infeasible_exits_nonzero_naming_the_shortfall(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    devices = write_devices(tmp_path / "devices.json", [1000, 1000])
    code = run(["--model", str(model_dir), "--devices", str(devices)])
    captured = capsys.readouterr()
    assert code == 1
    assert "bytes" in captured.err and "short" in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_missing_model_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    devices = write_devices(tmp_path / "devices.json", [10**9])
    code = run(["--model", str(tmp_path / "no" / "such" / "model"), "--devices", str(devices)])
    captured = capsys.readouterr()
    assert code == 2
    assert "not a valid Hugging Face repo id" in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_bad_devices_file_is_a_clean_error(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "devices.json").write_text('[{"id": "mac-a"}]')
    code = run(["--model", str(model_dir), "--devices", str(tmp_path / "devices.json")])
    assert code == 2
    assert "lacks" in capsys.readouterr().err
    code = run(["--model", str(model_dir), "--devices", str(tmp_path / "missing.json")])
    assert code == 2


def test_defaults_and_example_devices_file() -> None:
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    args = parser.parse_args(["--model", "m", "--devices", "d.json"])
    assert args.reserve_bytes == DEFAULT_RESERVE_BYTES == 1024**3
    assert args.json is False
    example = load_devices_json(REPO_ROOT / "tools" / "devices.example.json")
    assert [device.id for device in example] == ["mac-a", "mac-b"]


@pytest.mark.parametrize(("config_name", "devices", "budget_gib"),
                         [("deepseek_v3.json", 4, 400), ("qwen3_moe.json", 3, 180)])
def test_plans_published_moe_configs_with_active_parameters(
    config_name: str, devices: int, budget_gib: int, tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    """A directory with only config.json plans: memory from every expert, time from the few a
    token uses."""
    model = tmp_path / config_name.removesuffix(".json")
    model.mkdir()
    (model / "config.json").write_text((Path(__file__).parent / "configs" / config_name)
                                       .read_text())
    device_file = write_devices(tmp_path / "devices.json", [budget_gib * 1024**3] * devices)
    assert run(["--model", str(model), "--devices", str(device_file), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    profile = profile_model(model)
    for entry in plan["devices"]:
        assert entry["memory_bytes"] <= entry["memory_budget_bytes"]
        assert entry["streamed_layers"] == 0
    assert sum(len(entry["layers"]) for entry in plan["devices"]) == profile.num_layers
    # Compute time: each layer at the largest layer's *active* FLOPs on 2 TFLOP/s devices.
    active_ms = 1000 * (profile.num_layers * max(profile.layer_flops_per_token)
                        + profile.head_flops_per_token) / 2.0e12
    assert plan["breakdown_ms"]["compute"] == pytest.approx(active_ms, rel=1e-3)
    all_experts_ms = 1000 * 2 * (sum(profile.layer_bytes) / 2) / 2.0e12  # bf16: 2 bytes a weight
    assert plan["breakdown_ms"]["compute"] < all_experts_ms / 10


def test_a_model_dnet_cannot_run_is_a_clean_error(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "mamba"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**QWEN3_CONFIG, "model_type": "mamba"}))
    devices = write_devices(tmp_path / "devices.json", [10**9])
    assert run(["--model", str(model), "--devices", str(devices)]) == 2
    err = capsys.readouterr().err
    assert "'mamba' is not supported: dnet runs" in err and "Traceback" not in err
