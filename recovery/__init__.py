"""Recovery Bot's domain: the recovery case, its checks, policy, tokens and persistence.

Nothing in this package imports a web framework, Slack, Intercom or SMTP code; channels live in `bot/`.
"""
