"""Channels: the web app (web chat, enroll and cancel pages, webhooks), mail, the worker and the CLI.

Adapters here translate between the outside world and `recovery/`; they hold no business rules.
"""
