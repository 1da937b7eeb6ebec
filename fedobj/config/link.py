"""The edge link's keys: how train replies and models travel (``apps/link.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from fedobj.config.options import Need, Section, option

UPDATE_CODECS = ("none", "int8", "topk")
DOWNLINK_CODECS = ("none", "int8")


@dataclass(frozen=True)
class LinkConfig(Section):
    """Compressed updates and models, for devices on slow or metered links."""

    NAME = "link"
    TITLE = "The edge link"

    update_compression: str = option(
        "none",
        "train replies as the update, int8 with a scale per 256 values (4.3x "
        "fewer bytes), or its largest share (top-k) with error feedback",
        "none | int8 | topk",
    )
    topk_fraction: float = option(
        0.1,
        "topk: share of each tensor's update sent (the rest waits on the device)",
        "(0, 0.5]",
    )
    downlink_compression: str = option(
        "none",
        "int8: models go down as an int8 delta from the one the device holds",
        "none | int8",
    )

    @property
    def device_state(self) -> bool:
        """Whether devices keep link state on disk (residuals, held models)."""
        return self.update_compression == "topk" or self.downlink_compression != "none"

    def check(self, need: Need) -> None:
        need(
            self.update_compression in UPDATE_CODECS,
            "update-compression",
            "must be none, int8 or topk",
        )
        need(
            0 < self.topk_fraction <= 0.5,
            "topk-fraction",
            "must be in (0, 0.5] (above half, int8 sends fewer bytes)",
        )
        need(
            self.downlink_compression in DOWNLINK_CODECS,
            "downlink-compression",
            "must be none or int8",
        )
