"""vmkeep: data protection for KVM/libvirt virtual machines."""

__version__ = "0.1.0"
