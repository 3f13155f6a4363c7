"""Supported TRL and transformers versions, checked when :mod:`liger_align.trainers` is imported.

The trainers subclass TRL's and override a few of their methods, so they depend on TRL's internals; a
version outside the tested range fails at import with the range and the installed version, not later
with an ``AttributeError`` in the middle of a training run.
"""

from __future__ import annotations

from importlib import metadata

from packaging.version import InvalidVersion, Version

#: ``name -> (lowest supported, first unsupported)``; both bounds are PEP 440 versions.
SUPPORTED: dict[str, tuple[str, str]] = {
    "trl": ("1.16", "2"),  # the fused-LM-head protocol of DPO/KTO
    "transformers": ("4.56.2", "6"),
}


def installed_version(package: str) -> str | None:
    """The installed version string of ``package``, or None when it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check_supported_versions() -> None:
    """Raise ``ImportError`` naming the supported range when TRL or transformers is missing or out of range."""
    for package, (low, high) in SUPPORTED.items():
        wanted = f"{package}>={low},<{high}"
        found = installed_version(package)
        if found is None:
            raise ImportError(f"liger_align.trainers needs {wanted}, but {package} is not installed")
        try:
            parsed = Version(found)
        except InvalidVersion as err:
            raise ImportError(
                f"liger_align.trainers needs {wanted}; cannot parse the installed {package} {found!r}"
            ) from err
        # Compare the release only, so that 2.0.0.dev1 counts as 2.x and 1.15.0rc1 as 1.15.
        release = Version(".".join(str(p) for p in parsed.release))
        if not (Version(low) <= release < Version(high)):
            raise ImportError(
                f"liger_align.trainers supports {wanted}, but {package}=={found} is installed; "
                f"install a version in that range (pip install '{wanted}')"
            )
