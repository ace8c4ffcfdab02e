"""On-device agent of edgefleet: verify, install, serve, report. Imports no host library."""

__version__ = "0.1.0"
