"""The mDNS TXT record of a dnet node: `PeerInfo` <-> key/value strings. Pure.

The service's SRV port is the gRPC port and its A records the node's addresses (one per
interface; see discovery/addresses.py); everything else is in TXT, including which address is
the node's primary. Keys are short because the whole record travels in every announcement.
Each "key=value" string must fit in one DNS character-string (255 bytes), so descriptive
fields are cut to a budget, while fields that identify something (ids, model) are refused if
too long: a cut model name would silently name a different model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from discovery.addresses import Interface, reachable_address
from discovery.identity import is_node_id
from discovery.peers import PeerInfo

TXT_VERSION = "1"  # bump on an incompatible change: nodes ignore records of another version
MAX_TXT_STRING_BYTES = 255

KEY_VERSION = "v"
KEY_NODE_ID = "id"
KEY_NAME = "name"
KEY_HTTP_PORT = "http"
KEY_MEMORY = "mem"
KEY_STARTED_AT = "start"
KEY_SOFTWARE_VERSION = "ver"
KEY_PLATFORM = "plat"
KEY_CHIP = "chip"
KEY_CLUSTER = "cl"
KEY_MODEL = "model"
KEY_ADDRESS = "addr"  # the primary address among the A records

# Descriptive fields and the most bytes each keeps; longer values are cut (on a UTF-8 boundary).
TRUNCATED_FIELDS: Mapping[str, int] = {
    KEY_NAME: 63,
    KEY_SOFTWARE_VERSION: 64,
    KEY_PLATFORM: 64,
    KEY_CHIP: 128,
}
MAX_CLUSTER_ID_BYTES = 64
MAX_MODEL_BYTES = MAX_TXT_STRING_BYTES - len(KEY_MODEL) - 1

_DECIMAL = re.compile(r"[0-9]{1,20}")


def truncate_utf8(text: str, max_bytes: int) -> str:
    """The longest prefix of `text` whose UTF-8 encoding fits in `max_bytes`."""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def encode_txt(info: PeerInfo) -> dict[str, str]:
    """The TXT properties advertising `info`. Raises ValueError for an unadvertisable id/model."""
    if not is_node_id(info.node_id):
        raise ValueError(f"node id {info.node_id!r} is not 12 lowercase hex characters")
    if not info.cluster_id or len(info.cluster_id.encode("utf-8")) > MAX_CLUSTER_ID_BYTES:
        raise ValueError(f"cluster id must be 1..{MAX_CLUSTER_ID_BYTES} bytes")
    if len(info.model.encode("utf-8")) > MAX_MODEL_BYTES:
        raise ValueError(f"model name longer than {MAX_MODEL_BYTES} bytes: {info.model!r}")
    if not math.isfinite(info.started_at):
        raise ValueError(f"started_at must be finite, got {info.started_at!r}")
    if info.memory_budget_bytes < 0 or not _is_port(info.http_port):
        raise ValueError("memory budget must be >= 0 and the http port in 1..65535")
    return {
        KEY_VERSION: TXT_VERSION,
        KEY_NODE_ID: info.node_id,
        KEY_NAME: truncate_utf8(info.name, TRUNCATED_FIELDS[KEY_NAME]),
        KEY_HTTP_PORT: str(info.http_port),
        KEY_MEMORY: str(info.memory_budget_bytes),
        KEY_STARTED_AT: repr(float(info.started_at)),  # repr round-trips a float exactly
        KEY_SOFTWARE_VERSION: truncate_utf8(info.version, TRUNCATED_FIELDS[KEY_SOFTWARE_VERSION]),
        KEY_PLATFORM: truncate_utf8(info.platform, TRUNCATED_FIELDS[KEY_PLATFORM]),
        KEY_CHIP: truncate_utf8(info.chip, TRUNCATED_FIELDS[KEY_CHIP]),
        KEY_CLUSTER: info.cluster_id,
        KEY_MODEL: info.model,
        KEY_ADDRESS: info.address,
    }


def decode_txt(
    properties: Mapping[bytes, bytes | None],
    addresses: Sequence[str],
    port: int | None,
    instance: str,
    local: Sequence[Interface] = (),
) -> PeerInfo | None:
    """The `PeerInfo` in a resolved record, or None if the record is not a dnet node's of this
    TXT version or is malformed. Never raises: everything here comes off the network.

    `addresses` are the record's A records; its `address` is the one this node can reach,
    given its own interfaces `local` (see `discovery.addresses.reachable_address`)."""
    try:
        return _decode(properties, addresses, port, instance, local)
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError):
        return None


def _decode(
    properties: Mapping[bytes, bytes | None],
    addresses: Sequence[str],
    port: int | None,
    instance: str,
    local: Sequence[Interface],
) -> PeerInfo | None:
    # DNS-SD keys are case-insensitive; a key without "=" has the value None.
    fields = {
        key.decode("ascii").lower(): value.decode("utf-8")
        for key, value in properties.items()
        if isinstance(key, bytes) and isinstance(value, bytes)
    }
    if fields.get(KEY_VERSION) != TXT_VERSION:
        return None
    node_id = fields.get(KEY_NODE_ID, "")
    cluster = fields.get(KEY_CLUSTER, "")
    address = reachable_address(addresses, fields.get(KEY_ADDRESS), local)
    http_port = _decimal(fields.get(KEY_HTTP_PORT, ""))
    memory = _decimal(fields.get(KEY_MEMORY, ""))
    started_at = float(fields.get(KEY_STARTED_AT, "nan"))
    if (
        not is_node_id(node_id)
        or not cluster
        or address is None
        or not (isinstance(port, int) and _is_port(port))
        or http_port is None
        or not _is_port(http_port)
        or memory is None
        or not math.isfinite(started_at)
        or not isinstance(instance, str)
        or not instance
    ):
        return None
    return PeerInfo(
        node_id=node_id,
        name=fields.get(KEY_NAME, ""),
        address=address,
        grpc_port=port,
        http_port=http_port,
        memory_budget_bytes=memory,
        started_at=started_at,
        version=fields.get(KEY_SOFTWARE_VERSION, ""),
        platform=fields.get(KEY_PLATFORM, ""),
        chip=fields.get(KEY_CHIP, ""),
        cluster_id=cluster,
        model=fields.get(KEY_MODEL, ""),
        instance=instance,
    )


def _decimal(text: str) -> int | None:
    # int() would also accept "+1", " 1", "1_000" and non-ASCII digits; a record we write never
    # contains those, so anything else is a sign the record is not ours.
    return int(text) if _DECIMAL.fullmatch(text) else None


def _is_port(port: int) -> bool:
    return 1 <= port <= 65535
