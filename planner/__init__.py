"""Pure layer planner: which layers each device holds, in what ring order, over how many rounds,
and how many it keeps resident, chosen to minimise predicted decode time per token.

No MLX, gRPC, sockets or threads: plain data in, plain data out. See planner/README.md.
"""

from planner.cost import evaluate_candidate
from planner.devices import (
    DEFAULT_CONTEXT_TOKENS,
    DEFAULT_RESERVE_BYTES,
    DeviceProfile,
    PlanOptions,
    devices_from_list,
    load_devices_json,
)
from planner.model_profile import (
    LayerCache,
    ModelProfile,
    read_safetensors_header,
    stored_bytes,
    uniform_profile,
)
from planner.plan import (
    DevicePlan,
    InfeasiblePlanError,
    Plan,
    check_plan_structure,
    from_json,
    plan_from_dict,
    plan_to_dict,
    to_json,
)
from planner.solve import plan_layers

__all__ = [
    "DEFAULT_CONTEXT_TOKENS",
    "DEFAULT_RESERVE_BYTES",
    "DevicePlan",
    "DeviceProfile",
    "InfeasiblePlanError",
    "LayerCache",
    "ModelProfile",
    "Plan",
    "PlanOptions",
    "check_plan_structure",
    "devices_from_list",
    "evaluate_candidate",
    "from_json",
    "load_devices_json",
    "plan_from_dict",
    "plan_layers",
    "plan_to_dict",
    "read_safetensors_header",
    "stored_bytes",
    "to_json",
    "uniform_profile",
]
