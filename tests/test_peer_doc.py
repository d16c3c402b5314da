"""protocols/peer.md draws the lifecycle from the code: its transition table must be TRANSITIONS."""

from __future__ import annotations

import re
from pathlib import Path

from p2pfm.core.protocol import TRANSITIONS

DOC = Path(__file__).resolve().parents[1] / "protocols" / "peer.md"


def test_the_documented_transition_table_is_the_code():
    """Every row of the doc's table, in order, is an entry of TRANSITIONS, and nothing is missing."""
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \| `(\w+)` \|$", DOC.read_text(), flags=re.M)
    assert rows == [(p.value, e.value, n.value) for (p, e), n in TRANSITIONS.items()]


def test_the_diagram_has_every_transition():
    """The mermaid diagram shows each (phase -> next: event) edge of the table."""
    text = DOC.read_text()
    for (phase, event), next_phase in TRANSITIONS.items():
        assert re.search(rf"^\s+{phase.value} --> {next_phase.value}: {event.value}\b", text, flags=re.M), (
            phase,
            event,
            next_phase,
        )
