"""The start-up quorum: a partner counts only once its announcement lists our current libp2p id."""

from __future__ import annotations

from p2pfm.core.quorum import MAX_SEES, peers_to_list, quorum_view

ME = "12D3KooMe"


def test_quorum_of_one_is_ready_alone():
    """min_peers = 1 with nobody around: ready at once."""
    view = quorum_view(ME, {}, need=1)
    assert view.ready and view.have == 1 and view.seen == ()


def test_seen_peer_that_does_not_list_us_is_unconfirmed():
    """Seeing a partner is not enough: it must see us, or it would never push to us."""
    view = quorum_view(ME, {"peer-b": ["12D3KooOther"]}, need=2)
    assert not view.ready
    assert view.have == 1 and view.unconfirmed == ("peer-b",) and view.confirmed == ()


def test_partner_listing_us_confirms_it():
    """A partner whose announcement lists our libp2p id counts toward the quorum."""
    view = quorum_view(ME, {"peer-b": [ME], "peer-c": []}, need=2)
    assert view.ready and view.confirmed == ("peer-b",) and view.unconfirmed == ("peer-c",)


def test_quorum_needs_every_expected_partner():
    """need = 3: one confirmation is not enough, two are."""
    assert not quorum_view(ME, {"b": [ME], "c": ["x"]}, need=3).ready
    assert quorum_view(ME, {"b": [ME], "c": ["x", ME]}, need=3).ready


def test_stale_record_of_a_previous_life_does_not_confirm():
    """Partners listing the libp2p id of our previous process (before a restart) do not count."""
    assert not quorum_view("12D3KooNewLife", {"b": ["12D3KooOldLife"]}, need=2).ready


def test_describe_names_whom_we_wait_for():
    """The log line says who we have and whom we still wait for."""
    text = quorum_view(ME, {"b": [ME], "c": []}, need=3).describe()
    assert "have 2 of 3" in text and "c" in text.split("not yet hearing us:")[1]


def test_peers_to_list_puts_the_newest_first_and_caps_the_list():
    """Joiners (met most recently) are listed first; the list never exceeds MAX_SEES."""
    first_seen = {f"p{i}": float(i) for i in range(MAX_SEES + 10)}
    libp2p = {p: f"L{p}" for p in first_seen}
    listed = peers_to_list(first_seen, libp2p)
    assert len(listed) == MAX_SEES
    assert listed[0] == f"Lp{MAX_SEES + 9}" and "Lp0" not in listed


def test_peers_to_list_skips_peers_without_an_address():
    """Only peers whose libp2p id we know can be listed."""
    assert peers_to_list({"a": 1.0, "b": 2.0}, {"a": "La"}) == ["La"]
