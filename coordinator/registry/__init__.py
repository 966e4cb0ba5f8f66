"""Routing: the registry actor and its pure cores (scheduler, gates, breaker)."""
