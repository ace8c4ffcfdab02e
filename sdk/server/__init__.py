"""`edgefleet serve`: the REST API, Prometheus metrics and live dashboard over the fleet's store.

Import `create_app` from `edgefleet.sdk.server.app`; this package's `__init__` stays light so that
importing a sibling module (errors, auth) never pulls in FastAPI.
"""
