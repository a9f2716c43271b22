"""Connectors: the customer's own systems (CRM, ticketing, calendars, webhooks), one module per vendor."""
