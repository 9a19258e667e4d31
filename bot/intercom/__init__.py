"""The Intercom channel (DESIGN.md section 8): the signed webhook in, replies out through the outbox.

- `webhook`: POST/HEAD /webhooks/intercom. Verifies the signature, stores the event, answers at once.
- `parse`: a webhook payload to the customer's newest message (text, author, attachments), or nothing.
- `inbound`: the worker's side of a stored event: contact lookup, attachment downloads, the dialog turn.
- `client`: the official SDK behind a few calls, its errors translated to the outbox's retry rules.
- `sender`: delivers `intercom:` chat messages from the outbox (replies, quick replies, handover, redaction).

Nothing here decides anything about a case; `recovery/` does.
"""
