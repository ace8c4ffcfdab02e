"""Device profiles: the typed `Profile` schema, the built-in TOML files and their loader."""
