"""`dnet plan`: print the optimal layer plan for a model on a set of devices.

    dnet plan --model PATH_OR_ID --devices devices.json [--context N] [--reserve-bytes B] [--json]

Exit codes: 0 a plan was printed; 1 no plan fits (the message names the shortfall in bytes);
2 the inputs could not be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dnet.model_facts import profile_from_tensors, profile_model
from dnet.structure import UnsupportedModelError
from planner import (
    DEFAULT_CONTEXT_TOKENS,
    DEFAULT_RESERVE_BYTES,
    InfeasiblePlanError,
    ModelProfile,
    Plan,
    PlanOptions,
    load_devices_json,
    plan_layers,
    to_json,
)
from planner.explain import human_bytes, layer_ranges
from planner.model_profile import TensorInfo

EXIT_INFEASIBLE = 1
EXIT_BAD_INPUT = 2


class ModelResolutionError(Exception):
    """The --model argument is neither a model directory nor a reachable Hugging Face repo,
    or it is a model dnet cannot run."""


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="local model directory (a config.json alone will do), or a Hugging Face repo id "
             "(reads config and headers only)",
    )
    parser.add_argument("--devices", required=True, type=Path, help="JSON list of device profiles")
    parser.add_argument(
        "--context",
        type=int,
        default=DEFAULT_CONTEXT_TOKENS,
        help=f"tokens of KV cache to reserve on every device (default {DEFAULT_CONTEXT_TOKENS})",
    )
    parser.add_argument(
        "--reserve-bytes",
        type=int,
        default=DEFAULT_RESERVE_BYTES,
        help=f"per-device runtime reserve in bytes (default {DEFAULT_RESERVE_BYTES}, 1 GiB)",
    )
    parser.add_argument(
        "--window-covers-run",
        action="store_true",
        help="require each window to hold a whole per-round run (engines that load runs whole)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def _profile_from_hub(repo_id: str) -> ModelProfile:
    # Imported here: only the hub path needs it, and it is slow to import.
    from huggingface_hub import get_safetensors_metadata, snapshot_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ModelResolutionError(
            f"{repo_id!r} is not a model directory and not a valid Hugging Face repo id"
        ) from error
    try:
        # Only the JSON files: config.json and the safetensors index, never weights.
        local_dir = Path(snapshot_download(repo_id, allow_patterns=["*.json"]))
        config: dict[str, Any] = json.loads((local_dir / "config.json").read_text())
        # Headers come over HTTP range requests, so no tensor data is downloaded.
        metadata = get_safetensors_metadata(repo_id)
    except Exception as error:  # the hub raises many kinds; each one ends the same way
        raise ModelResolutionError(
            f"could not read {repo_id!r} from the Hugging Face hub: {error}"
        ) from error
    tensors = {
        name: TensorInfo(
            dtype=info.dtype,
            shape=tuple(info.shape),
            nbytes=info.data_offsets[1] - info.data_offsets[0],
        )
        for file_metadata in metadata.files_metadata.values()
        for name, info in file_metadata.tensors.items()
    }
    return profile_from_tensors(config, tensors, name=repo_id)


def resolve_model_profile(path_or_id: str) -> ModelProfile:
    """A local directory is profiled from its files; anything else is taken as a repo id."""
    path = Path(path_or_id).expanduser()
    try:
        if path.is_dir():
            return profile_model(path)
        if path.exists():
            raise ModelResolutionError(f"{path_or_id} is a file; --model needs a model directory")
        return _profile_from_hub(path_or_id)
    except UnsupportedModelError as exc:
        raise ModelResolutionError(str(exc)) from exc


def render_plan(plan: Plan, console: Console) -> None:
    table = Table(title=f"dnet plan: {plan.model}", title_justify="left")
    for column in ("device", "layers", "held", "window", "streamed", "memory used / budget"):
        table.add_column(column, justify="left" if column in ("device", "layers") else "right")
    for column in ("compute ms", "disk ms", "network ms", "holds"):
        table.add_column(column, justify="right" if column != "holds" else "left")
    for member in plan.devices:
        roles = [
            name
            for name, held in (("embedding", member.holds_embedding), ("head", member.holds_head))
            if held
        ]
        table.add_row(
            member.id,
            layer_ranges(member.layers),
            str(len(member.layers)),
            str(member.window),
            str(member.streamed_layers),
            f"{human_bytes(member.memory_bytes)} / {human_bytes(member.memory_budget_bytes)}",
            f"{member.compute_ms:.2f}",
            f"{member.disk_ms:.2f}",
            f"{member.network_ms:.2f}",
            ", ".join(roles),
        )
    console.print(table)
    console.print(
        f"ring {' -> '.join(plan.ring)}, {plan.rounds} round(s), {plan.hops_per_token} hop(s) "
        f"per token; predicted [bold]{plan.predicted_ms_per_token:.2f} ms/token[/bold] "
        f"(compute {plan.compute_ms:.2f}, disk {plan.disk_ms:.2f}, network {plan.network_ms:.2f})"
    )
    if plan.left_out:
        console.print(f"left out: {', '.join(plan.left_out)}")
    for line in plan.explanation[1:]:
        console.print(f"- {line}", highlight=False)


def run_plan(args: argparse.Namespace) -> int:
    try:
        model = resolve_model_profile(args.model)
        devices = load_devices_json(args.devices)
        options = PlanOptions(
            context_tokens=args.context,
            reserve_bytes=args.reserve_bytes,
            window_covers_run=bool(getattr(args, "window_covers_run", False)),
        )
    except (ModelResolutionError, OSError, ValueError) as error:
        print(f"dnet plan: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        plan = plan_layers(model, devices, options)
    except InfeasiblePlanError as error:
        print(f"dnet plan: {error}", file=sys.stderr)
        return EXIT_INFEASIBLE
    if args.json:
        sys.stdout.write(to_json(plan) + "\n")
    else:
        # Piped output is not wrapped at rich's default 80 columns.
        render_plan(plan, Console(width=None if sys.stdout.isatty() else 200))
    return 0
