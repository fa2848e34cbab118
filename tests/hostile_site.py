"""A ClientApp for tests: medae's own, except that the last site's training replies are poisoned.

Round 1: a NaN in the weights; round 2: an array of the wrong shape; round 3
and later: every weight multiplied by 1e6. Evaluation replies stay honest.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from client import app as medae_client

HOSTILE_PARTITION = 2
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = medae_client.train(msg, context)
    if int(context.node_config.get("partition-id", -1)) != HOSTILE_PARTITION or reply.has_error():
        return reply
    state = reply.content["arrays"].to_torch_state_dict()
    key = next(iter(state))
    rnd = int(msg.content["config"]["server-round"])
    if rnd == 1:
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("nan")
    elif rnd == 2:
        state[key] = torch.zeros(3)
    else:
        state = {k: v * 1e6 for k, v in state.items()}
    reply.content["arrays"] = ArrayRecord(state)
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return medae_client.evaluate(msg, context)
