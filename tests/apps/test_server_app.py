"""Pieces of the ServerApp that run without Flower's runtime."""

from __future__ import annotations

import pytest


def test_too_few_nodes_is_a_clear_error_before_round_1() -> None:
    from apps.server_app import wait_for_nodes
    from fedobj.errors import ConfigError

    class TwoNodes:
        def get_node_ids(self) -> list[int]:
            return [1, 2]

    assert wait_for_nodes(TwoNodes(), 2, settle_s=0.0, max_wait_s=2.0) == 2  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="min-nodes`=5"):
        wait_for_nodes(TwoNodes(), 5, settle_s=0.0, max_wait_s=0.3)  # type: ignore[arg-type]
