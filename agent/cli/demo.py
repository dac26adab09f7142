"""`tcu-agent demo`: the whole main job in one command, on a machine with nothing but Python.

A broker (embedded amqtt, or --broker), the simulated EV on a virtual CAN bus, the agent
signing its telemetry and executing commands, and a cloud-side view that verifies every
message: a campaign that captures current and voltage around the start of charging,
charge.start, the state of charge rising, charge.stop, and a summary.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"
CHARGE = "Vehicle.Powertrain.TractionBattery.Charging.Status"
LIMIT = "Vehicle.Powertrain.TractionBattery.Charging.ChargeLimit"
LOCKED = "Vehicle.Cabin.Door.IsLocked"


def add_parser(sub, common) -> None:
    p = sub.add_parser("demo", help="run the main job end to end with a simulated EV",
                       description="Start a broker, the simulated EV, the agent and a cloud "
                                   "view that verifies every message; send charge.start and "
                                   "charge.stop; print a summary. Exit 0 when every message "
                                   "verified and both commands succeeded.")
    p.add_argument("--duration", type=float, default=20.0, help="seconds to run (20)")
    p.add_argument("--broker", metavar="HOST:PORT",
                   help="use this broker (e.g. Mosquitto) instead of the embedded one")
    p.add_argument("--mqtt", choices=("auto", "5", "3.1.1"), default="auto",
                   help="MQTT version (auto: 5, and 3.1.1 when the broker refuses or drops 5)")
    p.add_argument("--workdir", help="keep keys and state here (default: a temporary folder)")
    p.add_argument("--quiet", action="store_true", help="only the summary")
    common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import logging
    if not hasattr(args, "log_level") and not getattr(args, "debug", False):
        logging.getLogger("agent").setLevel(logging.WARNING)  # the demo narrates itself
    if args.duration < 8:
        from ..errors import ConfigError
        raise ConfigError("--duration: at least 8 s (the commands need a few seconds each)")
    if args.broker:
        broker_address(args.broker)  # a bad flag is the flag's fault, before anything starts
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        return Demo(Path(args.workdir), args).run()
    with tempfile.TemporaryDirectory(prefix="tcu-demo-") as tmp:
        return Demo(Path(tmp), args).run()


def broker_address(text: str) -> tuple[str, int]:
    from ..errors import ConfigError
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--broker {text}: expected HOST:PORT (e.g. 127.0.0.1:1883)")
    return host.strip("[]"), int(port)


class Demo:
    def __init__(self, workdir: Path, args):
        self.dir = workdir
        self.args = args
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self.verified: dict[str, int] = {}
        self.failed = 0
        self.seqs: list[int] = []
        self.values: dict[str, object] = {}
        self.statuses: dict[str, list] = {}
        self.soc_first = self.soc_last = None
        self.capture: list[dict] = []  # the campaign's batches

    def say(self, text: str) -> None:
        if not self.args.quiet:
            print(f"[{time.monotonic() - self.t0:5.1f}s] {text}", flush=True)

    def run(self) -> int:
        from ..adapters.keys import generate_keypair, load_private_key, load_public_key
        from ..cloud.broker import EmbeddedBroker
        from ..config import load_config
        from ..core.cose import Signer, kid_of
        from ..app.runtime import Agent

        from ..resources import demo_config
        config_path = demo_config()
        keys = self.dir / "keys"
        for stem in ("vehicle", "cloud"):
            if not (keys / f"{stem}.key").exists():
                generate_keypair(keys, stem=stem)
        trust = self.dir / "trust.toml"
        trust.write_text(f'[[key]]\nname = "demo-cloud"\npublic_key = "{keys / "cloud.pub"}"\n'
                         'allow = ["charge.*", "doors.*", "state.*", "diag.*", "campaign.*", '
                         '"immobilizer.*", "rental.*", "rental.grant"]\n')
        broker = None
        protocol = "auto"
        if self.args.broker:
            host, port = broker_address(self.args.broker)
            self.say(f"broker: {host}:{port}")
        else:
            broker = EmbeddedBroker().start()
            host, port = broker.host, str(broker.port)
            protocol = "3.1.1"  # amqtt does not answer an MQTT 5 CONNECT at all
            self.say(f"broker: embedded amqtt on {host}:{port} (MQTT 3.1.1)")
        mqtt = getattr(self.args, "mqtt", "auto")
        protocol = protocol if mqtt == "auto" else mqtt
        # A cellular modem and a GNSS receiver on pseudo-terminals, as on a real unit.
        from ..sim.gnss import SimulatedGnss
        from ..sim.modem import SimulatedModem
        modem = SimulatedModem("ec25", rssi=20, registration=1, operator="Demo Mobile")
        gnss = SimulatedGnss([(48.1351, 11.5820), (48.1374, 11.5755), (48.1420, 11.5680)],
                             speed_kmh=40.0, rate_hz=1.0)  # driving its route
        modem.start()
        gnss.start()
        self.devices = (modem, gnss)
        config = load_config(config_path, [
            f"modem.port={modem.path!r}", "modem.poll_interval_s=5",
            f"gnss.port={gnss.path!r}",
            f"storage.dir={str(self.dir / 'state')!r}",
            f"control.socket={str(self.dir / 'control.sock')!r}",  # no /run/tcu-agent needed
            f"signing.key_file={str(keys / 'vehicle.key')!r}",
            f"commands.trust_store={str(trust)!r}", f"mqtt.host={host!r}", f"mqtt.port={port}",
            f"bus.0.channel='demo-{uuid.uuid4().hex[:8]}'", "mqtt.reconnect_min_s=0.2",
            f"mqtt.protocol={protocol!r}", "campaigns.max_buffer_bytes=4194304"])
        vin = config.vehicle.vin
        vkey = load_public_key(str(keys / "vehicle.pub"))
        self.keys = {kid_of(vkey): vkey}
        self.cloud_signer = Signer(load_private_key(keys / "cloud.key"))
        cloud = agent = None
        try:
            # The cloud view subscribes first: it must see every batch from seq 1 on.
            cloud = self._cloud(host, port, vin)
            agent = Agent(config)
            agent.start()
            self.say(f"agent: vin {vin}, simulated EV on virtual CAN, signing key "
                     f"{agent.publisher.signer.kid.hex()}")
            ok = self._script(agent, cloud, vin)
        finally:
            if cloud:
                cloud.close()
            if agent:
                agent.stop()
            for device in self.devices:
                device.stop()
            if broker:
                broker.stop()
        return self._summary(agent, ok)

    # -- the cloud side -------------------------------------------------------------------

    def _cloud(self, host, port, vin):
        import argparse

        from ..cloud.client import connect
        # The agent's protocol choice; against the embedded amqtt, 3.1.1 right away.
        mqtt = getattr(self.args, "mqtt", "auto")
        if mqtt == "auto" and not self.args.broker:
            mqtt = "3.1.1"
        args = argparse.Namespace(broker=f"{host}:{port}", tls_ca=None, tls_cert=None,
                                  tls_key=None, mqtt=mqtt)
        return connect(args, [f"vehicles/{vin}/#"], self._on_message)

    def _on_message(self, topic: str, data: bytes) -> None:
        from ..core.cose import verify
        from ..errors import VerificationError

        kind = topic.rsplit("/", 1)[-1]
        if kind == "commands":
            return
        try:
            body = verify(data, self.keys).payload
        except VerificationError as e:
            with self.lock:
                self.failed += 1
            self.say(f"cloud: REJECTED a message on {topic}: {e.reason}")
            return
        with self.lock:
            self.verified[kind] = self.verified.get(kind, 0) + 1
            if kind == "telemetry" and "campaign" in body:
                self.seqs.append(body["seq"])
                self.capture.append(body)
                self._campaign_line(body)
            elif kind == "telemetry":
                self.seqs.append(body["seq"])
                for name, samples in body["sig"].items():
                    self.values[name] = samples[-1][1]
                self._telemetry_line(body)
            elif kind == "responses" and body.get("id") in self.statuses:
                self.statuses[body["id"]].append((time.monotonic(), body))
            elif kind == "diagnostics":
                shown = ", ".join(f"{n} " + (" ".join(d["code"] for d in e["dtcs"])
                                             if len(e["dtcs"]) <= 3 else f"{len(e['dtcs'])} DTCs")
                                  if e["dtcs"] else f"{n} none" for n, e in body["ecus"].items())
                self.say(f"cloud: diagnostics record verified: {shown}")
            elif kind == "status":
                self.say(f"cloud: vehicle {'online' if body['online'] else 'offline'} "
                         f"(agent {body['agent']}), signature verified")

    def _telemetry_line(self, body) -> None:
        soc = self.values.get(SOC)
        if isinstance(soc, (int, float)):
            self.soc_first = soc if self.soc_first is None else self.soc_first
            self.soc_last = soc
        locked = self.values.get(LOCKED)
        shown = f"{soc:.1f}" if isinstance(soc, (int, float)) else "?"
        net = self.values.get("Vehicle.Connectivity.SignalStrength")
        lat = self.values.get("Vehicle.CurrentLocation.Latitude")
        lon = self.values.get("Vehicle.CurrentLocation.Longitude")
        where = f", at {lat:.4f},{lon:.4f}" if isinstance(lat, float) and isinstance(lon, float) else ""
        cell = f", LTE {net} dBm" if isinstance(net, int) else ""
        self.say(f"cloud: telemetry seq {body['seq']:>3} verified: SOC "
                 f"{shown} %, charger {self.values.get(CHARGE, '?')}, "
                 f"limit {self.values.get(LIMIT, '?')} %, doors "
                 f"{'locked' if locked else 'unlocked' if locked is False else '?'}{cell}{where}")

    def _campaign_line(self, body) -> None:
        n = sum(len(s) for s in body["sig"].values())
        t0 = (body["t0"] - body["trigger"]) / 1000
        t1 = (body["t0"] + max(s[-1][0] for s in body["sig"].values()) - body["trigger"]) / 1000
        self.say(f"cloud: campaign {body['campaign']} batch seq {body['seq']} verified: {n} "
                 f"samples of {', '.join(sorted(body['sig']))} from {t0:+.1f} s to {t1:+.1f} s "
                 "around the trigger")

    def _send(self, cloud, vin: str, name: str, params=None) -> str:
        now = int(time.time() * 1000)
        cid = f"demo-{name}-{uuid.uuid4().hex[:8]}"
        with self.lock:
            self.statuses[cid] = []
        payload = {"v": 1, "id": cid, "vin": vin, "name": name, "params": params or {},
                   "iat": now, "exp": now + 60_000}
        self.sent_at = getattr(self, "sent_at", {})
        self.sent_at[cid] = time.monotonic()
        cloud.publish(f"vehicles/{vin}/commands", self.cloud_signer.sign(payload))
        self.say(f"cloud: -> {name} (id {cid}), signed with the cloud key")
        return cid

    def _wait(self, cid: str, timeout: float) -> dict | None:
        shown = 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                new = self.statuses[cid][shown:]
            for at, body in new:
                shown += 1
                ms = (at - self.sent_at[cid]) * 1000
                extra = f" {body['reason']}: {body.get('detail', '')}" if body.get("reason") else ""
                self.say(f"cloud: <- {body['status']} after {ms:.0f} ms{extra} (verified)")
                if body["status"] in ("SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT"):
                    return {**body, "latency_ms": ms}
            time.sleep(0.02)
        return None

    def _script(self, agent, cloud, vin) -> bool:
        end = self.t0 + self.args.duration
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not self.seqs:
            time.sleep(0.05)
        up = agent.publisher.uplink.status()
        self.say(f"agent: uplink {up['state']} to {up['broker']} with MQTT {up['protocol']}")
        self.results = {}
        from ..cloud.main import load_campaign
        from ..resources import data_file
        campaign = load_campaign(str(data_file("configs", "campaign-charging.toml")))
        applied = self._send(cloud, vin, "campaign.apply", {"campaign": campaign})
        self.results["campaign.apply"] = self._wait(applied, 10)
        # Let the ring fill with up to 5 s of samples before charging starts (if time allows).
        time.sleep(min(5.0, max(0.0, end - time.monotonic() - 10)))
        start = self._send(cloud, vin, "charge.start")
        self.results["charge.start"] = self._wait(start, 10)
        charge_until = time.monotonic() + max(2.0, (end - time.monotonic()) - 5)
        while time.monotonic() < charge_until:
            time.sleep(0.1)
        stop = self._send(cloud, vin, "charge.stop")
        self.results["charge.stop"] = self._wait(stop, 10)
        self._diagnostics(agent, cloud, vin)
        self.results["rental"] = self._rental(agent, cloud, vin)
        time.sleep(max(0.0, end - time.monotonic()))  # the rest of --duration: live telemetry
        return all(r and r["status"] == "SUCCEEDED" for r in self.results.values())

    def _diagnostics(self, agent, cloud, vin) -> None:
        """A charger fault sets a DTC; the cloud reads it remotely, then clears it."""
        state = agent.simulator.vehicle.state
        state.fault = True
        self.say("vehicle: charger fault (the VCU stores P0D27)")
        time.sleep(0.2)
        read = self._wait(self._send(cloud, vin, "diag.read_dtcs", {"ecus": ["vcu", "bms"]}), 10)
        self.results["diag.read_dtcs"] = read
        if read and read.get("result"):
            for name, ecu in read["result"]["ecus"].items():
                codes = [f"{d['code']} (0x{d['status']:02X})" for d in ecu.get("dtcs", [])]
                self.say(f"cloud: {name}: " + (ecu["error"] if "error" in ecu else
                                               ", ".join(codes[:3]) + (f" +{len(codes) - 3} more"
                                                                       if len(codes) > 3 else "")
                                               or "no DTCs"))
            vcu = read["result"]["ecus"].get("vcu", {}).get("dtcs", [])
            if not any(d["code"] == "P0D27" for d in vcu):  # the demo must show it remotely
                self.say("cloud: the VCU did not report P0D27")
                self.results["diag.read_dtcs"] = {**read, "status": "FAILED"}
        state.fault = False
        self.say("vehicle: fault repaired")
        self.results["diag.clear_dtcs"] = self._wait(
            self._send(cloud, vin, "diag.clear_dtcs", {"ecus": ["vcu"]}), 10)

    # -- car sharing (PROTOCOL.md §11): a rental from grant to report ---------------------

    def _rental(self, agent, cloud, vin) -> dict | None:
        """The backend grants a phone's P-256 key; the phone unlocks and disables the
        immobilizer; rental.end refuses while the driver's door is open, then ends the rental
        with its report; the phone's next unlock is refused. A status-like dict for the
        summary: SUCCEEDED when every step answered as expected."""
        import json

        from ..adapters.keys import generate_keypair, load_private_key, load_public_key
        from ..cloud.grant import GrantSigner, make_grant

        keys = self.dir / "keys"
        if not (keys / "phone.key").exists():
            generate_keypair(keys, stem="phone", alg="es256")
        now = int(time.time() * 1000)
        rental = f"rental-{uuid.uuid4().hex[:8]}"
        allow = ["doors.*", "immobilizer.off", "rental.end"]
        grant = make_grant(self.cloud_signer, vin, rental, load_public_key(str(keys / "phone.pub")),
                           allow, now - 1000, now + 2 * 3_600_000)
        self.say(f"backend: grant for {rental}: the phone's P-256 key may use "
                 f"{', '.join(allow)} for 2 h ({len(grant)} bytes)")
        phone = GrantSigner(load_private_key(keys / "phone.key"), grant)
        car = agent.simulator.vehicle.state
        started = time.monotonic()
        good: list[bool] = []

        def step(name, params=None, expect="SUCCEEDED", reason=None, unverified=False):
            # unverified: refused before the command's signature was checked, so the answer
            # carries id null (the vehicle never echoes an id it has not verified)
            t = int(time.time() * 1000)
            cid = f"phone-{name}-{uuid.uuid4().hex[:8]}"
            key = None if unverified else cid
            with self.lock:
                self.statuses[key] = []
            self.sent_at = getattr(self, "sent_at", {})
            self.sent_at[key] = time.monotonic()
            cloud.publish(f"vehicles/{vin}/commands", phone.sign(
                {"v": 1, "id": cid, "vin": vin, "name": name, "params": params or {},
                 "iat": t, "exp": t + 60_000}))
            self.say(f"phone: -> {name}, signed with the phone's key, the grant in its header")
            r = self._wait(key, 10)
            good.append(r is not None and r["status"] == expect
                        and (reason is None or r.get("reason") == reason))
            return r

        step("doors.unlock")
        step("immobilizer.off")
        car.driver_door_open = True
        self.say("car: the driver gets out and leaves the driver's door open")
        time.sleep(0.3)
        step("rental.end", {"rental": rental}, "REJECTED", "PRECONDITION_FAILED")
        car.driver_door_open = False
        self.say("car: the driver closes the door")
        time.sleep(0.3)
        step("doors.lock")
        end = step("rental.end", {"rental": rental})
        if end and end.get("result"):
            shown = dict(end["result"])
            if isinstance(shown.get("dtcs"), dict):  # 40 codes of the BMS would fill the screen
                shown["dtcs"] = {ecu: f"{len(codes)} DTCs" for ecu, codes in shown["dtcs"].items()}
            self.say(f"cloud: end-of-rental report {json.dumps(shown, default=str)}")
        step("doors.unlock", expect="REJECTED", reason="UNAUTHORIZED", unverified=True)
        ms = (time.monotonic() - started) * 1000
        return {"status": "SUCCEEDED" if all(good) else "FAILED", "latency_ms": ms}

    def _summary(self, agent, ok: bool) -> int:
        total = sum(self.verified.values())
        seqs = sorted(set(self.seqs))
        gaps = [s for a, b in zip(seqs, seqs[1:]) for s in range(a + 1, b)]
        parts = ", ".join(f"{n} {k}" for k, n in sorted(self.verified.items()))
        print(f"summary: {total} messages verified ({parts}), {self.failed} failed "
              f"verification; telemetry seq {seqs[0] if seqs else '-'}..{seqs[-1] if seqs else '-'}"
              f"{' with gaps ' + str(gaps) if gaps else ', no gaps'}")
        for name, r in self.results.items():
            print(f"         {name}: " + (f"{r['status']} in {r['latency_ms']:.0f} ms" if r
                                          else "no terminal status"))
        if self.soc_first is not None:
            print(f"         state of charge {self.soc_first:.1f} % -> {self.soc_last:.1f} %")
        fired = [b for b in self.capture if b.get("trigger")]
        if fired:
            trig = fired[0]["trigger"]
            times = [b["t0"] + dt for b in fired for s in b["sig"].values() for dt, _ in s]
            print(f"         campaign {fired[0]['campaign']}: fired when charging started, "
                  f"{sum(len(s) for b in fired for s in b['sig'].values())} samples from "
                  f"{(min(times) - trig) / 1000:+.1f} s to {(max(times) - trig) / 1000:+.1f} s")
        else:
            print("         campaign: no capture received")
        good = (ok and bool(fired) and self.failed == 0 and total > 0 and not gaps
                and seqs[:1] == [1])
        print(f"demo {'OK' if good else 'FAILED'}")
        sys.stdout.flush()
        return 0 if good else 1
