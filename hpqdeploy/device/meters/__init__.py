"""Power meters (one module each, registered by name) and the recorder that turns their readings into energy."""
