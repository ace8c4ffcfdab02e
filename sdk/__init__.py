"""Host side of edgefleet: build, bundles and signing, fleet control plane, store, API and CLI."""
