"""Recurring billing: the pure domain (money, plans, calendar, dunning, invoices)
and the public surfaces (settings, CLI, signup)."""
