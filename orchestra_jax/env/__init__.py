"""Turning tokens into tool calls and observations: episodes, tools, the sandbox, the ledger, preferences, tau2."""
