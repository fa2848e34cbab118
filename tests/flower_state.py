"""A real Flower in-memory LinkState with one run and n virtual nodes, set up as Flower's simulation does.

Used by tests/test_sim_poller.py and benchmarks/sim_poller.py. It sets Flower's
task identity (run 1, task 1, the SuperLink's node) as a running SuperLink
would; tests restore it with the ``flower_task_identity`` fixture.
"""

from __future__ import annotations


def federation(n_nodes: int):
    """(state, node ids, grid) for a fresh in-memory LinkState with `n_nodes` registered nodes."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.proto.task_pb2 import Task
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=1)
    run.federation_id, run.primary_task_id = NOOP_FEDERATION_ID, 1
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[1] = Task(task_id=1, run_id=run.run_id)
    nodes = _register_nodes(n_nodes, factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, list(nodes), grid


def push(grid, node_ids, ttl=None) -> list[str]:
    """One empty "train" message to each node, through the ServerApp's grid; their message ids."""
    from flwr.app import Message, RecordDict

    ids = list(grid.push_messages([Message(RecordDict(), dst_node_id=n, message_type="train", ttl=ttl)
                                   for n in node_ids]))
    assert all(ids) and len(ids) == len(node_ids), "the LinkState refused a message"
    return ids


def flower_sweep(state, nodes) -> list:
    """What one sweep of Flower's own poller delivers (vce_api.add_messages_to_queue's loop body)."""
    return [m for n in nodes for m in state.get_message_ins(node_id=n, limit=1)]
