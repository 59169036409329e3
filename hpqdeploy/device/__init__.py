"""Measurement on devices: profiling, device profiles, adb, runners and power meters."""
