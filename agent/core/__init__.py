"""The device-safe core both sides share: wire protocol (topics, messages, codes), manifest, trust, verify, runtimes, quality.

Standard library, numpy and PyNaCl only; the host imports it, it never imports the host.
"""
