"""adapters/slots.py: the directory slot backend on real files."""

from __future__ import annotations

import os
import subprocess

import pytest

from agent.adapters.slots import DirectorySlots, SlotError
from agent.core.protocol import INSTALL_FAILED


@pytest.fixture
def slots(tmp_path) -> DirectorySlots:
    return DirectorySlots(tmp_path / "slots")


def artifact(tmp_path, data: bytes, name="fw.bin"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_fresh_base_reports_a_active(slots):
    assert slots.report() == {"active": "a", "pending": None, "slots": {"a": None, "b": None}}


def test_install_switch_confirm(tmp_path, slots):
    slot = slots.install_inactive(artifact(tmp_path, b"v2"), {"version": "2.0"})
    assert slot == "b" and slots.active() == "a"
    assert (slots.base / "b" / "payload").read_bytes() == b"v2"
    slots.switch_active("b")
    report = slots.report()
    assert report["active"] == "b"
    assert report["pending"] == {"slot": "b", "previous": "a", "boots": 0}
    assert slots.note_boot() == 1 and slots.note_boot() == 2
    slots.mark_good()
    assert slots.report()["pending"] is None and slots.active() == "b"
    assert slots.note_boot() == 0
    # the next update goes into a, the now inactive slot
    assert slots.install_inactive(artifact(tmp_path, b"v3")) == "a"
    assert (slots.base / "b" / "payload").read_bytes() == b"v2"
    assert [p.name for p in slots.base.iterdir() if p.name.startswith(".")] == []


def test_roll_back_returns_to_the_previous_slot(tmp_path, slots):
    slots.install_inactive(artifact(tmp_path, b"v2"), {"version": "2.0"})
    slots.switch_active("b")
    slots.roll_back()
    assert slots.report()["active"] == "a" and slots.report()["pending"] is None
    with pytest.raises(SlotError):
        slots.roll_back()  # nothing pending any more
    with pytest.raises(SlotError):
        slots.mark_good()


def test_install_refused_while_an_activation_is_pending(tmp_path, slots):
    slots.install_inactive(artifact(tmp_path, b"v2"))
    slots.switch_active("b")
    with pytest.raises(SlotError) as info:
        slots.install_inactive(artifact(tmp_path, b"v3"))
    assert info.value.reason == INSTALL_FAILED
    assert (slots.base / "b" / "payload").read_bytes() == b"v2"  # the running slot is intact


def test_switch_refusals_leave_the_active_slot(tmp_path, slots):
    for target in ("a", "c", "b"):  # already active, unknown, nothing installed
        with pytest.raises(SlotError):
            slots.switch_active(target)
        assert slots.report()["active"] == "a" and slots.report()["pending"] is None


def test_failed_install_leaves_both_slots_untouched(tmp_path, slots):
    slots.install_inactive(artifact(tmp_path, b"old-b"))
    with pytest.raises(SlotError) as info:
        slots.install_inactive(tmp_path / "missing.bin")
    assert info.value.reason == INSTALL_FAILED and "unchanged" in info.value.detail
    assert slots.active() == "a"
    assert (slots.base / "b" / "payload").read_bytes() == b"old-b"
    assert [p.name for p in slots.base.iterdir() if p.name.startswith(".")] == []


def test_disk_full_during_install_leaves_active_and_inactive(tmp_path):
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mountpoint)],
                          capture_output=True, check=False)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        slots = DirectorySlots(mountpoint / "slots")
        slots.install_inactive(artifact(tmp_path, b"small", "small.bin"))
        slots.switch_active("b")
        slots.mark_good()
        big = artifact(tmp_path, os.urandom(400_000), "big.bin")
        with pytest.raises(SlotError) as info:
            slots.install_inactive(big)
        assert info.value.reason == INSTALL_FAILED
        assert slots.active() == "b"
        assert (slots.base / "b" / "payload").read_bytes() == b"small"
        assert [p.name for p in slots.base.iterdir() if p.name.startswith(".")] == []
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_corrupt_pointer_or_marker_is_an_error_not_a_guess(tmp_path, slots):
    slots.base.mkdir(parents=True)
    (slots.base / "active").write_text("c\n")
    with pytest.raises(SlotError):
        slots.active()
    (slots.base / "active").write_text("a\n")
    (slots.base / "pending.json").write_text("{")
    with pytest.raises(SlotError):
        slots.report()


def test_power_cut_between_marker_and_pointer_is_undone_at_start(tmp_path, slots):
    """switch_active writes the marker, then the pointer. Cut in between: at start the restart
    rule sees ACTIVATING with the old slot still active, fails the activation and drops the
    marker; the vehicle keeps running slot a."""
    from agent.core import updates as u

    slots.install_inactive(artifact(tmp_path, b"v2"))
    (slots.base / "pending.json").write_text('{"slot": "b", "previous": "a", "boots": 0}')
    found = u.UpdateState(state=u.ACTIVATING, command_id="act-1", target="fw", slot="b")
    actions = u.on_restart(found, slots.report(), 0)
    for action in actions:
        if isinstance(action, u.RollBackSlot):
            slots.roll_back()
    assert slots.report()["active"] == "a" and slots.report()["pending"] is None
    assert actions[-1] == u.Report(command_id="act-1", status="FAILED", reason=INSTALL_FAILED,
                                   detail=actions[-1].detail)
    assert [a.state.state for a in actions if isinstance(a, u.Save)] == [u.FAILED_STATE]
