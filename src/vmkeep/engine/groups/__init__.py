"""Ordered groups of VMs: members, ordered start/stop and group restore (``manage``), and the
group-consistent backup: freeze in order, begin all, thaw in reverse (``backup``), with its
catalog rows and freeze times (``records``). Imports the rooms below it (``protect`` and
``restore`` included)."""
