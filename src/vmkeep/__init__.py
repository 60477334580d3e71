"""vmkeep: data protection for KVM/libvirt virtual machines."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vmkeep")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+src"
