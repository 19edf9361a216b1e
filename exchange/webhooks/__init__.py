"""Fill webhooks (issue 4): signing, SSRF guard, retry schedule, the delivery worker and the broker API's SQL.

The worker (issue 6: batches) is :mod:`.pump` (claim due events in batches, POST them concurrently, record the
outcomes in batches) over :mod:`.store` (its SQL), :mod:`.delivery` (one attempt), :mod:`.outcomes` (what an
answer leads to) and :mod:`.http` (keep-alive HTTP/1.1 client); :mod:`.queue` sends the "events are due" hints.

Lifecycle of an outbox row (``webhook_events``), written by the matcher in the fill's transaction:

* ``pending`` — to be delivered at or after ``next_attempt_at``. A worker *claims* it (in a batch) by moving
  ``next_attempt_at`` one lease into the future (and bumping ``attempts``, the claim's fencing token), so an
  event whose ``next_attempt_at`` is in the future is either scheduled for a retry or in flight; either way
  nobody else touches it until then. A worker that dies mid-attempt only delays the event by one lease. A
  redeliver makes it due now whatever its state and bumps its ``generation``: an attempt claimed before that
  fails no longer moves it (:mod:`.store` states the fencing rule).
* ``delivered`` — a 2xx answer was recorded. Delivery is at-least-once: ``webhook-id`` lets receivers dedupe.
* ``failed`` — the retry schedule ran out, or the receiver answered 410 Gone.
* ``skipped`` — never sent: the broker has no webhook URL or its endpoint is disabled.

Every event stays readable in the broker's durable log (``GET /events``) whatever its delivery status.
"""
