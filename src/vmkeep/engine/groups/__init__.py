"""Ordered groups of VMs: members, ordered start/stop and group restore (``manage``), and the
group-consistent backup: freeze in order, begin all, thaw in reverse (``backup``), with its
catalog rows and freeze times (``records``); the group drill: a group restore point's members
booted together on an isolated network and probed (``drill``). Imports the rooms below it (``protect`` and
``restore`` included)."""
