"""Runners execute an exported artifact on a device and time it (one module each, registered by name)."""
