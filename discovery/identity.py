"""Who a node is: its persistent node id, and the public id of the cluster it belongs to.

Pure apart from `load_or_create_node_id` and `replace_node_id`, which touch only the file they
are given. Nothing here opens sockets, starts threads or reads the clock.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

SERVICE_TYPE = "_dnet_p2p._tcp.local."

NODE_ID_HEX_CHARS = 12
OPEN_CLUSTER_ID = "open"
CLUSTER_ID_HEX_CHARS = 16
# Domain separation: the advertised id is useless as a hash of the key in any other protocol,
# and a version bump here changes every cluster id at once if the scheme ever has to change.
_CLUSTER_ID_DOMAIN = b"dnet/cluster-id/v1"

_NODE_ID_PATTERN = re.compile(rf"[0-9a-f]{{{NODE_ID_HEX_CHARS}}}")


def new_node_id() -> str:
    """A fresh random node id: 12 lowercase hex characters (48 bits)."""
    return secrets.token_hex(NODE_ID_HEX_CHARS // 2)


def is_node_id(text: str) -> bool:
    """Whether `text` has the exact shape `new_node_id` produces."""
    return _NODE_ID_PATTERN.fullmatch(text) is not None


def cluster_id(key: str | None) -> str:
    """The id a node advertises for its cluster key, from which the key cannot be read back.

    No key (None or "") gives the fixed id "open", so keyless nodes on a LAN find each other.
    An empty key counts as no key because `--cluster-key ""` is how a shell spells "unset".
    """
    if not key:
        return OPEN_CLUSTER_ID
    digest = hmac.new(_CLUSTER_ID_DOMAIN, key.encode("utf-8"), hashlib.sha256).hexdigest()
    return digest[:CLUSTER_ID_HEX_CHARS]


def load_or_create_node_id(path: Path) -> str:
    """The node id stored at `path`, creating (and storing) a new one if none is valid there.

    A missing, empty or corrupt file gets a fresh id: refusing to start over a garbled
    one-line state file would help nobody, and the old id is worthless once unreadable.
    """
    try:
        stored = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        stored = ""
    if is_node_id(stored):
        return stored
    return replace_node_id(path)


def replace_node_id(path: Path) -> str:
    """Store a fresh node id at `path` (e.g. after losing a duplicate-id contest); return it."""
    node_id = new_node_id()
    _write_atomically(path, node_id + "\n")
    return node_id


def _write_atomically(path: Path, text: str) -> None:
    # Write a sibling temp file and rename it over the target, so a crash mid-write leaves
    # either the old id or the new one, never a truncated file.
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
