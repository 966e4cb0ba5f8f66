"""Capability floors: the request traits a floor may name, and provider versions.

Versions are semantic (``0.10.0 > 0.9.9``); an unparsable one is below every floor.
A leaf module: the configuration checks its floors here, and routing applies them.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Final, NamedTuple

# What a capability floor (config ``capability_floors``) may name: registry/traits.py.
TRAIT_NAMES: Final = ("tools", "vision")

_VERSION = re.compile(
    r"^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$"
)


class Version(NamedTuple):
    """A tuple, so that comparing two is one C-level comparison: every routing
    decision with a capability floor compares one per provider it looks at."""

    major: int
    minor: int
    patch: int
    # A pre-release ("0.6.3-rc1") sorts below its release.
    is_release: bool = True

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}" + ("" if self.is_release else "-pre")


@lru_cache(maxsize=1024)
def parse_version(text: str | None) -> Version | None:
    """Parse ``MAJOR[.MINOR[.PATCH]][-pre]``; ``None`` for anything else."""
    if not text:
        return None
    match = _VERSION.match(text.strip())
    if match is None:
        return None
    major, minor, patch, prerelease = match.groups()
    return Version(int(major), int(minor or 0), int(patch or 0), is_release=prerelease is None)


def meets_floor(version: Version | None, floor: Version | None) -> bool:
    """A provider with no parsable version is below every floor."""
    if floor is None:
        return True
    return version is not None and version >= floor
