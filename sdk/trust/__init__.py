"""The fleet's chain of trust on the host: signing keys, signed bundles, broker credentials."""
