"""Flower's simulation message poller, made linear in the number of virtual sites.

Flower 1.41's Simulation Runtime moves the ServerApp's messages to the virtual
nodes with `vce_api.add_messages_to_queue`: every 0.1 s it asks the in-memory
LinkState, node by node, for that node's next undelivered message. Each ask
(`InMemoryLinkState.get_message_ins`) walks every stored message and re-validates
each one it passes, under the state's lock. With n sites and n messages in flight
a sweep is n² checks, all round long, since a message stays stored until its
reply is pulled. At 1,000 sites the poller used a whole core and held the lock
the actors' replies wait for (BENCHMARKS.md, "Scale in sites").

`add_messages_to_queue` here does the same job with one pass per sweep: it reads
which nodes have an undelivered message, takes each such node's first one (as
Flower's ``limit=1`` does), validates just those with the state's own check
(expiry, federation membership; invalid ones are deleted, as Flower deletes
them), marks them delivered with the same timestamp format, and queues them.
A sweep with nothing to deliver reads each stored message once and checks none.

It relies on `InMemoryLinkState` internals (``lock``, ``message_ins_store``,
``_check_stored_messages``), so `install` replaces Flower's poller only on the
Flower versions it was written and tested against (`TESTED_FLOWER`), and only
for an in-memory state; anything else keeps Flower's own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from queue import Queue

log = logging.getLogger(__name__)

TESTED_FLOWER = ("1.41.",)  # version prefixes whose InMemoryLinkState this module was checked against
SWEEP_SECONDS = 0.1  # Flower's own interval between sweeps


def deliver_pending(state, nodes: Iterable[int]) -> list:
    """One sweep: each of `nodes`' first undelivered message, validated and marked delivered."""
    from flwr.supercore.date import now

    wanted = nodes if isinstance(nodes, frozenset) else frozenset(nodes)
    with state.lock:
        first: dict[int, str] = {}
        for msg_id, msg in state.message_ins_store.items():
            md = msg.metadata
            if md.delivered_at == "" and md.dst_node_id in wanted and md.dst_node_id not in first:
                first[md.dst_node_id] = msg_id
        if not first:
            return []
        state._check_stored_messages(set(first.values()))  # Flower's own check; deletes what is invalid
        messages = [state.message_ins_store[i] for i in first.values() if i in state.message_ins_store]
        delivered_at = now().isoformat()
        for msg in messages:
            msg.metadata.delivered_at = delivered_at
    return messages


def add_messages_to_queue(state, queue: Queue, nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
    """Drop-in for ``vce_api.add_messages_to_queue``: same arguments, same messages, one pass per sweep."""
    nodes = frozenset(nodes_mapping)  # built once, not every sweep
    while not f_stop.is_set():
        for msg in deliver_pending(state, nodes):
            queue.put(msg)
        f_stop.wait(SWEEP_SECONDS)


def _supported(state) -> bool:
    import flwr
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    return (flwr.__version__.startswith(TESTED_FLOWER) and isinstance(state, InMemoryLinkState)
            and all(hasattr(state, a) for a in ("lock", "message_ins_store", "_check_stored_messages")))


def install() -> None:
    """Make Flower's Simulation Runtime use `add_messages_to_queue` where it is safe to (see module docstring).

    Idempotent. Flower's `run_api` looks the poller up by name when a simulation
    starts; the replacement hands any state it does not know back to Flower's own.
    """
    from flwr.server.superlink.fleet.vce import vce_api

    flower_poller = getattr(vce_api.add_messages_to_queue, "_flower_poller", vce_api.add_messages_to_queue)

    def poller(state, queue, nodes_mapping, f_stop):
        if _supported(state):
            return add_messages_to_queue(state, queue, nodes_mapping, f_stop)
        log.debug("keeping Flower's message poller for %s", type(state).__name__)
        return flower_poller(state, queue, nodes_mapping, f_stop)

    poller._flower_poller = flower_poller
    vce_api.add_messages_to_queue = poller
