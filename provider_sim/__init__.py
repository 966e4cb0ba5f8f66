"""A simulated provider fleet that speaks the real protocol, with scripted faults."""
