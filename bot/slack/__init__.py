"""The Slack channel for staff: approval cards, decisions through modals, reminders, `/recovery`."""
