"""Test lab: real tiny guests for e2e tests, the demo and benchmarks."""

from vmkeep.lab.lab import Lab, make_ext4_qcow2, parse_size

__all__ = ["Lab", "make_ext4_qcow2", "parse_size"]
