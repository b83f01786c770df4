"""The operations endpoint: ``/metrics``, ``/healthz`` and ``/status`` over HTTP.

Served by the channel itself when ``metrics_port`` is set (``prx-email run`` gets
it that way too), on the channel's event loop. It only reads what the channel
already keeps: :meth:`EmailChannel.mailboxes` for the states, the plain counters
for ``/metrics`` and one outbox query per scrape. ``prometheus_client`` is
imported only here, so a channel without the endpoint never loads it.

- ``/metrics``: Prometheus text (see :mod:`.prometheus` for the names);
- ``/healthz``: 200 when every mailbox is connected, else 503; the JSON body lists
  the mailboxes that are not, with their state and code (it is a readiness check:
  a mailbox still logging in counts as not healthy yet);
- ``/status``: a JSON list, one object per mailbox (a ``MailboxStatus``).
"""
