"""medae.sim_poller: the simulation's message poller delivers what Flower's does, in one pass per sweep."""

import threading
from queue import Queue

import pytest

from medae import sim_poller
from tests.flower_state import federation, flower_sweep, push

pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.mark.parametrize("sweep", [flower_sweep, sim_poller.deliver_pending], ids=["flower", "medae"])
def test_each_node_gets_its_first_message_per_sweep_and_each_message_once(sweep):
    state, nodes, grid = federation(4)
    first = push(grid, nodes)
    second = push(grid, nodes[:1])  # node 0 has a second message waiting
    outsider = push(grid, nodes[3:])  # node 3 is not among the polled nodes below
    polled = nodes[:3]

    one = sweep(state, polled)
    assert sorted(m.metadata.message_id for m in one) == sorted(first[:3])
    assert all(m.metadata.delivered_at for m in one)
    two = sweep(state, polled)
    assert [m.metadata.message_id for m in two] == second
    assert sweep(state, polled) == []
    undelivered = [i for i in first[3:] + outsider if state.message_ins_store[i].metadata.delivered_at == ""]
    assert undelivered == first[3:] + outsider


@pytest.mark.parametrize("sweep", [flower_sweep, sim_poller.deliver_pending], ids=["flower", "medae"])
def test_an_expired_message_is_dropped_not_delivered(sweep):
    state, nodes, grid = federation(2)
    [expired] = push(grid, nodes[:1], ttl=60.0)
    state.message_ins_store[expired].metadata.__dict__["_created_at"] -= 3600  # created an hour ago
    [fresh] = push(grid, nodes[1:])

    delivered = sweep(state, nodes)
    assert [m.metadata.message_id for m in delivered] == [fresh]
    assert expired not in state.message_ins_store


def test_a_sweep_checks_only_what_it_delivers(monkeypatch):
    """The quadratic cost is gone: an idle sweep validates nothing, a busy one each delivered message once."""
    state, nodes, grid = federation(30)
    push(grid, nodes)
    checked = []
    original = state._check_stored_messages
    monkeypatch.setattr(state, "_check_stored_messages", lambda ids, *a: (checked.append(len(ids)),
                                                                            original(ids, *a)))
    assert len(sim_poller.deliver_pending(state, nodes)) == 30
    assert sim_poller.deliver_pending(state, nodes) == []
    assert checked == [30]
    checked.clear()
    flower_sweep(state, nodes)  # Flower's poller: every stored message, once per node
    assert sum(checked) == 30 * 30


def test_the_installed_poller_feeds_the_queue_and_stops(monkeypatch):
    from flwr.server.superlink.fleet.vce import vce_api

    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)  # restored afterwards
    sim_poller.install()
    sim_poller.install()  # idempotent: still one layer over Flower's own
    poller = vce_api.add_messages_to_queue
    assert poller._flower_poller.__module__ == "flwr.server.superlink.fleet.vce.vce_api"

    state, nodes, grid = federation(3)
    ids = push(grid, nodes)
    queue, stop = Queue(), threading.Event()
    thread = threading.Thread(target=poller, args=(state, queue, {n: i for i, n in enumerate(nodes)}, stop))
    thread.start()
    got = sorted(queue.get(timeout=10).metadata.message_id for _ in ids)
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert got == sorted(ids)


def test_an_unknown_state_or_flower_version_keeps_flowers_poller(monkeypatch):
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api

    calls = []
    monkeypatch.setattr(vce_api, "add_messages_to_queue", lambda *a: calls.append(a))
    sim_poller.install()
    state, nodes, grid = federation(1)
    vce_api.add_messages_to_queue(object(), None, {}, None)  # not an in-memory LinkState
    monkeypatch.setattr(flwr, "__version__", "9.0.0")
    vce_api.add_messages_to_queue(state, None, {}, None)  # a Flower this module was not checked against
    assert len(calls) == 2
