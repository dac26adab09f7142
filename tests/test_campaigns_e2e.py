"""Campaigns end to end: a real agent process fed through an slcan pseudo-terminal, a real
Mosquitto, signed campaign commands, and the capture checked against the frames sent."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from agent.adapters.keys import generate_keypair, load_private_key
from agent.core.cose import Signer
from support.agentproc import VIN, AgentProcess, SlcanFeeder, Verifier, wait_for
from support.mosquitto import Consumer, Mosquitto, publish

pytestmark = pytest.mark.mqtt


class Rig:
    def __init__(self, tmp_path, test_dbc, extra: str = ""):
        self.tmp = tmp_path
        keys = tmp_path / "cloudkeys"
        generate_keypair(keys, stem="fleet")
        generate_keypair(keys, stem="viewer")
        self.trust = tmp_path / "trust.toml"
        self.trust.write_text(f"""
[[key]]
name = "fleet"
public_key = "{keys / 'fleet.pub'}"
allow = ["campaign.*", "state.*"]

[[key]]
name = "viewer"
public_key = "{keys / 'viewer.pub'}"
allow = ["state.*"]
""")
        self.fleet = Signer(load_private_key(keys / "fleet.key"))
        self.viewer = Signer(load_private_key(keys / "viewer.key"))
        self.broker = Mosquitto().start()
        self.feeder = SlcanFeeder(tmp_path, test_dbc).start()
        self.consumer = Consumer(self.broker.host, self.broker.port, f"vehicles/{VIN}/#").start()
        self.agent = AgentProcess(tmp_path, test_dbc, self.feeder.link,
                                  {"host": self.broker.host, "port": self.broker.port},
                                  extra=f'[commands]\ntrust_store = "{self.trust}"\n{extra}')
        self.agent.start()
        self.verifier = Verifier(self.agent.public_key)
        wait_for(lambda: self.payloads("telemetry"), 30, "the agent's first telemetry")

    def payloads(self, kind: str) -> list[dict]:
        mine = [m for m in self.consumer.messages if not m.topic.endswith("/commands")]
        return self.verifier.check(mine).get(kind, [])

    def command(self, name, params=None, signer=None) -> dict:
        cid = f"t-{uuid.uuid4().hex[:12]}"
        now = int(time.time() * 1000)
        msg = (signer or self.fleet).sign({"v": 1, "id": cid, "vin": VIN, "name": name,
                                           "params": params or {}, "iat": now,
                                           "exp": now + 60_000})
        publish(self.broker.host, self.broker.port, f"vehicles/{VIN}/commands", msg)

        def terminal():
            for p in self.payloads("responses"):
                if p["id"] == cid and p["status"] in ("SUCCEEDED", "FAILED", "REJECTED"):
                    return p
            return None
        return wait_for(terminal, 20, f"the status of {name}")

    def restart_killed(self) -> None:
        """SIGKILL the agent, start it again, wait until it is online and subscribed."""
        self.agent.kill()
        t = int(time.time() * 1000)
        self.agent.start()
        wait_for(lambda: any(p["online"] and p["t"] >= t for p in self.payloads("status")), 30,
                 "the restarted agent online")
        time.sleep(0.5)  # its SUBSCRIBE follows the CONNACK

    def close(self):
        self.agent.close()
        self.consumer.stop()
        self.feeder.close()
        self.broker.close()


@pytest.fixture
def rig(tmp_path, test_dbc):
    r = Rig(tmp_path, test_dbc, extra="[campaigns]\nmax_buffer_bytes = 200000\n")
    yield r
    r.close()


def frame_index(soc, volts, counter) -> set[int]:
    """Feeder frame numbers i (mod 1000) whose SOC, PackVoltage and Counter these are."""
    return {i for i in range(1000) if (i // 10) % 100 == round(soc) and
            400 + i % 7 == round(volts) and i % 16 == counter}


def test_a_firing_sends_the_pre_trigger_samples_of_the_frames_sent(rig):
    soc_now = (rig.feeder.sent // 10) % 100
    target = (soc_now + 4) % 100  # about 4 s from now
    campaign = {"id": "soc-cross", "version": 1, "priority": 0,
                "signals": [{"name": "BMS_Status.SOC"}, {"name": "BMS_Status.PackVoltage"},
                            {"name": "BMS_Status.Counter"}],
                "trigger": {"condition": f"BMS_Status.SOC == {target}", "pre_ms": 500,
                            "post_ms": 300}}
    s = rig.command("campaign.apply", {"campaign": campaign})
    assert s["status"] == "SUCCEEDED", s
    assert s["result"] == {"id": "soc-cross", "version": 1, "state": "active"}

    def capture():
        got = [p for p in rig.payloads("telemetry") if p.get("campaign") == "soc-cross"]
        t = [p for p in got if p["t0"] > p["trigger"]]  # a post-trigger batch
        return got if t else None
    batches = wait_for(capture, 30, "the campaign's batches")
    trigger = batches[0]["trigger"]
    assert all(p["trigger"] == trigger for p in batches)
    seqs = [p["seq"] for p in rig.payloads("telemetry")]
    assert sorted(set(seqs)) == list(range(1, max(seqs) + 1))  # one seq sequence, no gap

    rows = []  # (t, soc, volts, counter), each frame captured once
    for p in sorted(batches, key=lambda p: p["seq"]):
        cols = [p["sig"][n] for n in ("BMS_Status.SOC", "BMS_Status.PackVoltage",
                                      "BMS_Status.Counter")]
        assert len({len(c) for c in cols}) == 1  # every frame gives a sample of each
        for (dt, soc), (dt2, volts), (dt3, counter) in zip(*cols):
            assert dt == dt2 == dt3
            rows.append((p["t0"] + dt, soc, volts, counter))
    pre = [r for r in rows if r[0] <= trigger]
    post = [r for r in rows if r[0] > trigger]
    # The frame that fired: the first with the target SOC (the rising edge). Frames that arrive
    # in the same millisecond after it (a feeder catching up under load) are pre-trigger too.
    fired = next(r for r in pre if round(r[1]) == target)
    assert fired[0] == trigger and all(r[0] == trigger for r in pre[pre.index(fired):])
    assert pre[0][0] >= trigger - 500 and len(pre) >= 20  # ~50 at 100 Hz
    assert post and post[-1][0] <= trigger + 300
    # Every captured sample is a frame the feeder sent, in order, with none left out.
    (first,) = frame_index(*fired[1:])
    assert first % 1000 == (target * 10) % 1000
    idx = []
    for _t, soc, volts, counter in rows:
        (i,) = frame_index(soc, volts, counter)
        idx.append(i)
    assert idx == [(idx[0] + k) % 1000 for k in range(len(idx))]

    listed = rig.command("campaign.list")["result"]["campaigns"]
    assert listed == [{"id": "soc-cross", "version": 1, "state": "active"}]
    status = json.loads(rig.agent.cli("status", "--json").stdout)
    (row,) = status["campaign"]["campaigns"]
    assert row["id"] == "soc-cross" and row["firings"] == 1 and row["held_bytes"] > 0


def test_refusals(rig):
    good = {"id": "x", "version": 1, "signals": [{"name": "BMS_Status.SOC"}],
            "trigger": {"period_ms": 1000}}
    s = rig.command("campaign.apply", {"campaign": good}, signer=rig.viewer)
    assert (s["status"], s["reason"]) == ("REJECTED", "UNAUTHORIZED")
    bad = dict(good, signals=[{"name": "BMS_Status.SOC"}, {"name": "BMS_Status.Nope"}])
    s = rig.command("campaign.apply", {"campaign": bad})
    assert (s["status"], s["reason"]) == ("REJECTED", "BAD_PARAMS")
    assert "unknown signal(s) BMS_Status.Nope" in s["detail"]
    syntax = dict(good, trigger={"condition": "BMS_Status.SOC >> 3"})
    s = rig.command("campaign.apply", {"campaign": syntax})
    assert s["reason"] == "BAD_PARAMS" and "at position 17" in s["detail"]
    greedy = dict(good, trigger={"condition": "BMS_Status.SOC > 3", "pre_ms": 600_000})
    s = rig.command("campaign.apply", {"campaign": greedy})
    assert s["reason"] == "BAD_PARAMS" and "campaigns.max_buffer_bytes" in s["detail"]
    s = rig.command("campaign.remove", {"id": "never-applied"})
    assert s["reason"] == "BAD_PARAMS" and "never-applied" in s["detail"]
    assert rig.command("campaign.list")["result"] == {"campaigns": []}


def test_apply_replace_and_expire_across_sigkill(rig):
    now = int(time.time() * 1000)
    keep = {"id": "keep", "version": 1, "signals": [{"name": "BMS_Status.PackVoltage"}],
            "trigger": {"period_ms": 200}}
    assert rig.command("campaign.apply", {"campaign": keep})["status"] == "SUCCEEDED"
    assert rig.command("campaign.apply", {"campaign": dict(keep, version=2)})["status"] == \
        "SUCCEEDED"
    short = dict(keep, id="short", version=1, expiry=now + 8000)
    assert rig.command("campaign.apply", {"campaign": short})["status"] == "SUCCEEDED"
    later = dict(keep, id="later", start=now + 3_600_000)
    assert rig.command("campaign.apply", {"campaign": later})["result"]["state"] == "waiting"

    rig.restart_killed()  # SIGKILL: no clean stop
    listed = rig.command("campaign.list")["result"]["campaigns"]
    assert {(c["id"], c["version"]) for c in listed} >= {("keep", 2), ("later", 1)}
    s = rig.command("campaign.apply", {"campaign": dict(keep, version=2)})
    assert s["reason"] == "BAD_PARAMS" and "not newer than the applied version 2" in s["detail"]
    t_restart = int(time.time() * 1000)
    wait_for(lambda: any(p.get("campaign") == "keep" and p["t0"] > t_restart
                         for p in rig.payloads("telemetry")), 20, "keep's batches again")
    # `short` ends at its expiry, removed by the vehicle itself (and from the store)
    wait_for(lambda: time.time() * 1000 > now + 8500, 20, "the expiry")
    wait_for(lambda: "short" not in (rig.agent.storage / "campaigns.json").read_text(), 10,
             "short removed from the store")
    listed = rig.command("campaign.list")["result"]["campaigns"]
    assert [c["id"] for c in listed] == ["keep", "later"]
    rig.restart_killed()
    assert rig.command("campaign.list")["result"]["campaigns"] == listed
    assert rig.command("campaign.remove", {"id": "keep"})["status"] == "SUCCEEDED"
    assert [c["id"] for c in rig.command("campaign.list")["result"]["campaigns"]] == ["later"]


def test_tcu_cloud_campaign_apply_list_remove(rig, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    path = tmp_path / "c.toml"
    path.write_text('id = "from-file"\nversion = 3\n[[signals]]\nname = "BMS_Status.SOC"\n'
                    '[trigger]\nperiod_ms = 500\n')
    keys = rig.tmp / "cloudkeys"
    common = ["--broker", f"{rig.broker.host}:{rig.broker.port}", "--vin", VIN,
              "--key", str(keys / "fleet.key"), "--pub", str(rig.agent.keydir / "vehicle.pub")]

    def tool(*args):
        return subprocess.run([sys.executable, "-m", "agent.cloud.main", "campaign", *args,
                               *common], cwd=ROOT, capture_output=True, text=True, timeout=60)

    applied = tool("apply", str(path))
    assert applied.returncode == 0, applied.stdout + applied.stderr
    lines = [json.loads(x) for x in applied.stdout.splitlines()]
    assert lines[-1]["status"] == "SUCCEEDED" and lines[-1]["verified"] is True
    listed = tool("list")
    assert json.loads(listed.stdout.splitlines()[-1])["result"] == {
        "campaigns": [{"id": "from-file", "version": 3, "state": "active"}]}
    (tmp_path / "c.json").write_text(json.dumps({"campaign": {
        "id": "from-file", "version": 3, "signals": [{"name": "BMS_Status.SOC"}],
        "trigger": {"period_ms": 500}}}))
    again = tool("apply", str(tmp_path / "c.json"))
    assert again.returncode == 1 and "not newer" in again.stdout
    assert tool("remove", "from-file").returncode == 0
    bad = tool("apply", str(tmp_path / "missing.toml"))
    assert bad.returncode == 2 and "cannot read" in bad.stderr
