"""What a round spent on privacy, said once per round in the run's log.

Privacy is only as good as its accounting is visible: with DP-SGD on the nodes
(``dp=true``) each node reports its own spend and what it is computed from; with
central DP the server's accountant (apps/central_dp.py) holds the spend, which a
version also records so that the next run continues the ledger. These lines are
the operator's view of both, written after every round's training. Here too is
the one way central DP ends a run early with an error: its accountant refusing a
round whose sample changed (a spent budget is a stop, not an error: the loop's).
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.serverapp.strategy import Strategy

from apps.central_dp import spend
from apps.replies import NodeOutcome
from fedobj import keys
from fedobj.errors import FedObjError

# the round's lines, wherever the step that writes them lives
log = logging.getLogger("fedobj.strategy")


class CentralDpError(FedObjError):
    """Central DP cannot go on as configured (e.g. the sampled population changed)."""


def refuse(server_round: int, mode: str, exc: ValueError) -> None:
    """Raise :class:`CentralDpError` for a round central DP's accountant refused
    (Flower's raises ``ValueError`` when the sample size changed); without
    central DP (``mode`` ``"none"``) the error is not ours and the caller
    re-raises it."""
    if mode != "none":
        raise CentralDpError(
            f"round {server_round}: central DP accounting cannot go on: {exc}"
        ) from None


def log_node_spend(server_round: int, outcomes: list[NodeOutcome]) -> None:
    """DP-SGD: each node's spend this far, and what it is computed from."""
    for o in outcomes:
        if keys.DP_EPSILON in o.metrics:
            m = o.metrics
            log.info(
                "round %d: node %d DP epsilon %.4f (delta %g; rdp accountant, "
                "noise multiplier %g, sample rate %.5f, %d steps this round)",
                server_round,
                o.node_id,
                m[keys.DP_EPSILON],
                m.get(keys.DP_DELTA, float("nan")),
                m.get(keys.DP_NOISE_MULTIPLIER, float("nan")),
                m.get(keys.DP_SAMPLE_RATE, float("nan")),
                int(m.get(keys.DP_STEPS, 0)),
            )


def central_spend(
    server_round: int, wrapper: Strategy, mode: str
) -> dict[str, Any] | None:
    """Central DP: the spend so far (fixed clipping with an accountant), logged,
    or the clipping bound (adaptive, or no accountant); None without central DP.

    ``wrapper`` is Flower's DP wrapper around the inner strategy, ``mode`` the
    run config's ``central-dp``. The spend returned goes into the round's version.
    """
    if mode == "none":
        return None
    privacy = spend(wrapper)
    if privacy is not None:
        p = privacy
        log.info(
            "round %d: central DP epsilon %.4f at delta %g after %d releases "
            "(%s accountant, noise multiplier %g, clipping norm %g, %d nodes "
            "sampled, no amplification by sampling)",
            server_round,
            p["epsilon"],
            p["delta"],
            p["releases"],
            p["accountant"],
            p["noise_multiplier"],
            p["clipping_norm"],
            p["sampled_nodes"],
        )
    else:
        log.info(
            "round %d: central DP (%s) %s %.4f, noise multiplier "
            "%g; no accountant (central-dp-epsilon=0)",
            server_round,
            mode,
            "clipping norm now" if mode.endswith("adaptive") else "clipping norm",
            float(getattr(wrapper, "clipping_norm", float("nan"))),
            float(getattr(wrapper, "noise_multiplier", float("nan"))),
        )
    return privacy
