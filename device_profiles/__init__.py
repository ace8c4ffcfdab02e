"""Device profiles: the typed `Profile` schema, the built-in TOML files and their loader."""

from __future__ import annotations

from edgefleet.device_profiles.errors import ProfileError
from edgefleet.device_profiles.loader import builtin_names, load_profile, load_profile_file
from edgefleet.device_profiles.schema import ISA_FEATURES, PRECISIONS, RUNTIMES, Gpu, Profile

__all__ = [
    "ISA_FEATURES",
    "PRECISIONS",
    "RUNTIMES",
    "Gpu",
    "Profile",
    "ProfileError",
    "builtin_names",
    "load_profile",
    "load_profile_file",
]
