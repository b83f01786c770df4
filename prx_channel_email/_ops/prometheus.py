"""The channel's counters and mailbox states in the Prometheus text format.

Nothing here is updated while mail flows: the channel keeps its plain counters
(``_support.observability.Metrics``) and its status as before, and a scrape turns
a snapshot of them into metric families. So the endpoint costs nothing between
scrapes and nothing per mailbox beyond the lines it prints.

Each channel has its own ``CollectorRegistry`` (never the process-global one), so
two channels in one process, or a host's own metrics, do not collide.

Label sets are bounded: ``account`` and ``folder`` come from the configuration,
``reason`` / ``cause`` / ``code`` / ``event`` from the names the code counts under
(a fixed set), never from mail.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from prx_channel_email._version import __version__
from prx_channel_email.status import ChannelState, MailboxStatus

PREFIX = "prx_email"


@dataclass(frozen=True)
class CounterSet:
    """One set of counters (a ``Metrics.snapshot()``) and whose they are.

    ``folder`` None: the set belongs to the account as a whole (its outbox, say);
    the per-folder metrics in it are then labelled with an empty folder.
    """

    account: str
    folder: str | None
    counts: Mapping[str, int]


# Counted per mailbox: dotted name -> (metric name without _total, help).
_FOLDER_COUNTERS: dict[str, tuple[str, str]] = {
    "inbound.handed_on": ("messages_delivered", "Messages handed on to the agent."),
    "inbound.redelivered": (
        "messages_redelivered",
        "Messages handed on again after a restart (not acknowledged before).",
    ),
    "inbound.fetched": ("messages_fetched", "Message bodies downloaded from IMAP."),
    "inbound.moved": ("messages_moved", "Handled messages moved to move_to_folder."),
    "inbound.errors": ("inbound_errors", "Errors while reading or deciding on mail."),
    "imap.connects": ("imap_connects", "IMAP sessions opened (logged in, folder selected)."),
    "imap.idle_cycles": ("imap_idle_cycles", "IDLE cycles completed."),
    "imap.uidvalidity_changes": ("imap_uidvalidity_changes", "UIDVALIDITY changes seen."),
}

# Counted per account (summed over its mailboxes).
_ACCOUNT_COUNTERS: dict[str, tuple[str, str]] = {
    "outbound.sent": ("replies_sent", "Replies and new mail accepted by the SMTP server."),
    "outbound.failed": ("replies_failed", "Sends that failed for good."),
    "outbound.queued": ("replies_queued", "Sends put into the outbox."),
    "outbound.duplicates_suppressed": (
        "replies_duplicates_suppressed",
        "Sends not repeated because the outbox already held their idempotency key.",
    ),
    "outbound.saved_to_sent": ("replies_saved_to_sent", "Sent mail copied to the Sent folder."),
    "outbound.save_sent_failed": (
        "replies_save_sent_failed",
        "Sent mail that could not be copied to the Sent folder.",
    ),
    "inbound.skipped.duplicate": (
        "messages_duplicate",
        "Messages skipped as copies of mail already handed on.",
    ),
    "inbound.quarantined": ("messages_quarantined", "Messages quarantined by the policy."),
    "inbound.deferred": ("messages_deferred", "Messages kept back by a rate limit."),
    "inbound.held": ("messages_held", "Messages held by the loop guard."),
    "inbound.released": ("messages_released", "Deferred or held messages handed on later."),
    "inbound.quarantine_released": (
        "messages_quarantine_released",
        "Quarantined messages the operator released, handed on.",
    ),
    "inbound.quarantine_release_failed": (
        "messages_quarantine_release_failed",
        "Releases of quarantined mail that failed (gone, refused, unreadable).",
    ),
    "inbound.oversized": ("messages_oversized", "Messages above max_message_bytes."),
    "smtp.connects": ("smtp_connects", "SMTP connections opened."),
    "smtp.reconnects": ("smtp_reconnects", "SMTP connections opened again after a drop."),
}

# ``name.<label>`` families: prefix -> (metric, label, help, per folder?).
_FAMILIES: dict[str, tuple[str, str, str, bool]] = {
    "inbound.skipped.": (
        "messages_refused",
        "reason",
        "Messages the policy refused (not handed on), by reason.",
        False,
    ),
    "imap.reconnects.": ("imap_reconnects", "cause", "IMAP reconnections, by cause.", True),
    "storage.faults.": ("storage_faults", "code", "Failed state writes, by code.", False),
    "inbound.attachments.skipped.": (
        "attachments_skipped",
        "reason",
        "Attachments not saved, by reason.",
        False,
    ),
}

_GAUGE_FAMILIES: dict[str, tuple[str, str, str]] = {
    "inbound.waiting.": ("messages_waiting", "kind", "Messages waiting (deferred or held)."),
}

_LABEL_VALUE = re.compile(r"[^a-z0-9_]")


def _label(suffix: str) -> str:
    """A code-given suffix as a label value (lower-case, no surprises)."""
    return _LABEL_VALUE.sub("_", suffix.lower())[:64]


class ChannelCollector(Collector):
    """Turns the channel's snapshots into metric families at scrape time."""

    def __init__(
        self,
        mailboxes: Callable[[], list[MailboxStatus]],
        counters: Callable[[], list[CounterSet]],
        outbox_pending: Callable[[], Mapping[str, int]],
    ) -> None:
        self._mailboxes = mailboxes
        self._counters = counters
        self._outbox_pending = outbox_pending

    def collect(self) -> Iterator[Metric]:
        yield from self._mailbox_gauges(self._mailboxes())
        yield from self._counter_families(self._counters())
        pending = GaugeMetricFamily(
            f"{PREFIX}_outbox_pending",
            "Outbox rows not yet accepted by the SMTP server (pending, sending or held).",
            labels=["account"],
        )
        for account, count in sorted(self._outbox_pending().items()):
            pending.add_metric([account], count)
        yield pending
        info = GaugeMetricFamily(f"{PREFIX}_build_info", "The package version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info

    def _mailbox_gauges(self, boxes: list[MailboxStatus]) -> Iterator[Metric]:
        labels = ["account", "folder"]
        up = GaugeMetricFamily(
            f"{PREFIX}_mailbox_up",
            "1 when the mailbox is connected (logged in, folder selected), else 0.",
            labels=labels,
        )
        idling = GaugeMetricFamily(
            f"{PREFIX}_mailbox_idling",
            "1 while the mailbox waits in IDLE for a push.",
            labels=labels,
        )
        last = GaugeMetricFamily(
            f"{PREFIX}_mailbox_last_message_timestamp_seconds",
            "When the mailbox last handed a message on (this run).",
            labels=labels,
        )
        here = GaugeMetricFamily(
            f"{PREFIX}_mailbox_here",
            "1 when this process serves the mailbox; 0 when another replica holds its lease"
            " (shared state) or nobody does yet.",
            labels=labels,
        )
        replicas = GaugeMetricFamily(
            f"{PREFIX}_mailbox_replica",
            "1 for the replica serving the mailbox, as this process last read the leases"
            " (shared state only).",
            labels=[*labels, "replica"],
        )
        for box in boxes:
            key = [box.account, box.folder]
            up.add_metric(key, 1 if box.state is ChannelState.CONNECTED else 0)
            idling.add_metric(key, 1 if box.idling else 0)
            here.add_metric(key, 1 if box.here else 0)
            if box.replica is not None:
                replicas.add_metric([*key, box.replica], 1)
            if box.last_message_at is not None:
                last.add_metric(key, box.last_message_at)
        yield from (up, idling, last, here, replicas)

    def _counter_families(self, sets: list[CounterSet]) -> Iterator[Metric]:
        per_folder: dict[tuple[str, str, str], int] = defaultdict(int)  # (name, acc, folder)
        per_account: dict[tuple[str, str], int] = defaultdict(int)
        family: dict[tuple[str, str, str, str], int] = defaultdict(int)  # (prefix, acc, f, lbl)
        gauges: dict[tuple[str, str, str], int] = defaultdict(int)
        other: dict[tuple[str, str], int] = defaultdict(int)
        for cs in sets:
            folder = cs.folder or ""
            for name, value in cs.counts.items():
                if name in _FOLDER_COUNTERS:
                    per_folder[name, cs.account, folder] += value
                elif name in _ACCOUNT_COUNTERS:
                    per_account[name, cs.account] += value
                elif prefix := _prefix(name, _FAMILIES):
                    where = folder if _FAMILIES[prefix][3] else ""
                    family[prefix, cs.account, where, _label(name[len(prefix) :])] += value
                elif prefix := _prefix(name, _GAUGE_FAMILIES):
                    gauges[prefix, cs.account, _label(name[len(prefix) :])] += value
                else:
                    other[cs.account, _label(name)] += value
        for name, (metric, doc) in _FOLDER_COUNTERS.items():
            c = CounterMetricFamily(f"{PREFIX}_{metric}", doc, labels=["account", "folder"])
            for (n, account, folder), value in sorted(per_folder.items()):
                if n == name:
                    c.add_metric([account, folder], value)
            yield c
        for name, (metric, doc) in _ACCOUNT_COUNTERS.items():
            c = CounterMetricFamily(f"{PREFIX}_{metric}", doc, labels=["account"])
            for (n, account), value in sorted(per_account.items()):
                if n == name:
                    c.add_metric([account], value)
            yield c
        for prefix, (metric, label, doc, per) in _FAMILIES.items():
            names = ["account", "folder", label] if per else ["account", label]
            c = CounterMetricFamily(f"{PREFIX}_{metric}", doc, labels=names)
            for (p, account, folder, value_label), value in sorted(family.items()):
                if p == prefix:
                    c.add_metric([account, folder, value_label] if per else [account, value_label],
                                 value)  # fmt: skip
            yield c
        for prefix, (metric, label, doc) in _GAUGE_FAMILIES.items():
            g = GaugeMetricFamily(f"{PREFIX}_{metric}", doc, labels=["account", label])
            for (p, account, value_label), value in sorted(gauges.items()):
                if p == prefix:
                    g.add_metric([account, value_label], value)
            yield g
        events = CounterMetricFamily(
            f"{PREFIX}_events",
            "Other counted events, by their internal name (see stats()).",
            labels=["account", "event"],
        )
        for (account, event), value in sorted(other.items()):
            events.add_metric([account, event], value)
        yield events


def _prefix(name: str, table: Mapping[str, object]) -> str | None:
    for prefix in table:
        if name.startswith(prefix):
            return prefix
    return None


def make_registry(collector: ChannelCollector) -> CollectorRegistry:
    """A registry of this channel's own, with the process's CPU, memory and fds."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
