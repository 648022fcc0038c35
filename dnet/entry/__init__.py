"""The entry node: it owns requests, sends them into the ring and streams their tokens back.

`entry.py` is the I/O edge (links, the event loop), `decisions.py` its pure choices
(admission, replay, prompt steps), `inflight.py` the state shared with gRPC and control
threads, `service.py` the token sink the tails stream to. No HTTP and no MLX here.
"""

from dnet.entry.decisions import DEFAULT_MAX_REQUESTS, PREFILL_CHUNK
from dnet.entry.entry import DecodeStats, RingEntry, RingError, Timeouts
from dnet.entry.inflight import Inflight
from dnet.entry.service import EntryService, local_address_towards

__all__ = ["DEFAULT_MAX_REQUESTS", "PREFILL_CHUNK", "DecodeStats", "EntryService", "Inflight",
           "RingEntry", "RingError", "Timeouts", "local_address_towards"]
