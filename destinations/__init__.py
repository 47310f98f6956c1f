"""Destinations: one module per type. Import ``destinations.registry`` to get them all."""
