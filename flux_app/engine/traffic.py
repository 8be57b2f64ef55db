"""Bytes on the wire, per message type and direction, over every record kind.

ArrayRecords (models, descriptors, sketches) dominate, but MetricRecords (losses, info) and
ConfigRecords (settings) travel too and are counted: a method that sends its data as metrics
must not look free.
"""

from __future__ import annotations

from collections import defaultdict

from flwr.app import RecordDict


def record_bytes(content: RecordDict) -> int:
    """Payload bytes of every record in ``content`` (Flower's own ``count_bytes``)."""
    return sum(record.count_bytes() for record in content.values())


class Traffic:
    """Running byte counts: ``by_type[message_type]["up" | "down"]`` and the current round's."""

    def __init__(self) -> None:
        self.by_type: dict[str, dict[str, int]] = defaultdict(lambda: {"up": 0, "down": 0})
        self.round = {"up": 0, "down": 0}

    def start_round(self) -> None:
        """Reset the per-round counters."""
        self.round = {"up": 0, "down": 0}

    def count(self, message_type: str, direction: str, content: RecordDict) -> int:
        """Add ``content``'s size to ``message_type``/``direction``; returns the size."""
        size = record_bytes(content)
        self.by_type[message_type][direction] += size
        self.round[direction] += size
        return size

    def up(self, *message_types: str) -> int:
        """Bytes uploaded by the given message types."""
        return sum(self.by_type[t]["up"] for t in message_types)


__all__ = ["Traffic", "record_bytes"]
