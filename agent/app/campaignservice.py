"""campaign.apply / remove / list on the core thread, and the engine that runs them.

The campaign document was validated whole by the gate (the family's check_params: syntax,
signals, limits); what depends on the applied set (a newer version, the shared buffer
budget) is checked here. A campaign is written to the store before it is in force, so a
SUCCEEDED campaign survives a power cut. Each poll ticks the engine (start, expiry, time
campaigns, captures), hands its batches to the publisher and, when the set of signals the
campaigns read changed, re-installs the core's taps and the buses' receive filters.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..adapters.campaignstore import CampaignStore
from ..adapters.canbus import receive_filters
from ..core import campaigns as K
from ..core.campaignengine import CampaignEngine
from ..core.commands import Command
from ..core.executor import Status
from ..core.protocol import BAD_PARAMS, FAILED, INTERNAL_ERROR, REJECTED, SUCCEEDED
from ..errors import AgentError, ParamError

if TYPE_CHECKING:
    from ..adapters.canbus import BusReader
    from ..config import Config
    from ..core.selection import BusPlan
    from ..core.telemetry import TelemetryCore

log = logging.getLogger("agent.campaigns")


def limits(config: Config) -> K.Limits:
    c = config.campaigns
    return K.Limits(max_campaigns=c.max_campaigns, max_conditions=c.max_conditions,
                    max_buffer_bytes=c.max_buffer_bytes, max_capture_ms=c.max_capture_ms,
                    max_window_ms=c.max_window_ms, assumed_period_ms=c.assumed_period_ms)


class CampaignHandler:
    """The `campaign` family."""

    def __init__(self, config: Config, plans: Sequence[BusPlan], core: TelemetryCore,
                 readers: Sequence[BusReader], publish_batch: Callable | None,
                 now_ms: int | None = None):
        self.catalog = K.Catalog(plans)
        self.limits = limits(config)
        self.family = K.campaign_family(self.catalog, self.limits)
        tel = config.telemetry
        self.engine = CampaignEngine(self.catalog, self.limits, config.campaigns.stale_ms,
                                       tel.max_batch_age_ms, tel.max_batch_bytes)
        self.core = core
        self.readers = readers
        self.publish_batch = publish_batch
        self.store = CampaignStore(config.storage.dir)
        self.counters: Counter[str] = Counter()
        self._load(int(time.time() * 1000) if now_ms is None else now_ms)

    def _load(self, now_ms: int) -> None:
        docs = self.store.load()
        valid = []
        for doc in docs:
            try:
                valid.append(K.parse_campaign(doc, self.catalog, self.limits))
            except ParamError as e:
                log.error("stored campaign %r is no longer valid here, dropped: %s",
                          doc.get("id"), e)
        for _c, why in self.engine.load(valid, now_ms):
            log.error("stored campaign dropped: %s", why)
        expired = self.engine.tick(now_ms)
        if len(self.engine.applied) != len(docs) or expired:
            self._save()
        self._install()
        if self.engine.applied:
            log.info("%d campaign(s) in force from the store", len(self.engine.applied))

    # -- Handler --------------------------------------------------------------------------

    def handle(self, cmd: Command, now_ms: int) -> list[Status]:
        if cmd.name == K.LIST:
            return [Status(cmd.id, SUCCEEDED, result={"campaigns": self.engine.list(now_ms)})]
        if cmd.name == K.REMOVE:
            cid = cmd.params["id"]
            if cid not in self.engine.applied:
                return [Status(cmd.id, REJECTED, BAD_PARAMS, f"no campaign {cid!r} is applied")]
            old = self.engine.applied[cid]
            docs = [dict(c.doc) for c in self.engine.applied.values() if c.id != cid]
            try:
                self.store.save(docs)
            except AgentError as e:
                return [Status(cmd.id, FAILED, INTERNAL_ERROR, str(e))]
            self.engine.remove(cid, now_ms)
            self._install()
            self.counters["campaigns_removed"] += 1
            log.info("campaign %s version %d removed", cid, old.version)
            return [Status(cmd.id, SUCCEEDED, result={"id": cid, "version": old.version})]
        try:
            c = K.parse_campaign(cmd.params["campaign"], self.catalog, self.limits)
        except ParamError as e:  # the gate checked it already; kept for direct callers
            return [Status(cmd.id, REJECTED, BAD_PARAMS, e.detail)]
        why = self.engine.check_apply(c)
        if why:
            return [Status(cmd.id, REJECTED, BAD_PARAMS, why)]
        docs = [dict(x.doc) for x in self.engine.applied.values() if x.id != c.id]
        try:
            self.store.save(docs + [dict(c.doc)])  # durable before in force
        except AgentError as e:
            return [Status(cmd.id, FAILED, INTERNAL_ERROR, str(e))]
        self.engine.apply(c, now_ms)
        self._install()
        self.counters["campaigns_applied"] += 1
        log.info("campaign %s version %d applied (%s)", c.id, c.version, c.state(now_ms))
        return [Status(cmd.id, SUCCEEDED,
                       result={"id": c.id, "version": c.version, "state": c.state(now_ms)})]

    def poll(self, now_ms: int) -> list[Status]:
        expired = self.engine.tick(now_ms)
        if expired:
            log.info("campaign(s) expired and removed: %s", ", ".join(expired))
            self.counters["campaigns_expired"] += len(expired)
            self._save()
        if self.engine.changed:
            self._install()
        self._deliver()
        return []

    def running(self, command_id: str) -> bool:
        return False  # answered at once

    def status(self) -> dict:
        now_ms = int(time.time() * 1000)
        counters = dict(self.counters)
        counters["campaign_evaluations"] = self.engine.evaluations
        counters["campaign_window_gaps"] = self.engine.window_gaps
        return {"campaigns": self.engine.status(now_ms), "counters": counters}

    def close(self) -> None:
        """At stop: what the captures hold goes out."""
        self.engine.flush()
        self._deliver()

    # -- internals ------------------------------------------------------------------------

    def _save(self) -> None:
        try:
            self.store.save([dict(c.doc) for c in self.engine.applied.values()])
        except AgentError as e:
            log.error("%s", e)

    def _install(self) -> None:
        """Taps on the core and the buses' kernel receive filters for the running set."""
        self.core.set_taps(self.engine.taps(), self.engine.trim)
        for i, reader in enumerate(self.readers):
            if reader.cfg.filters:
                reader.set_filters(receive_filters(self.core.tapped(i)))

    def _deliver(self) -> None:
        for batch in self.engine.take_batches():
            self.counters["campaign_batches"] += 1
            if self.publish_batch is None:
                continue
            try:
                self.publish_batch(batch)
            except AgentError as e:  # its samples are carried in the next batch's drop
                self.counters["campaign_batches_lost"] += 1
                log.error("campaign batch not queued: %s", e)
