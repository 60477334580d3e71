"""The VM lifecycle (OpenNebula's DispatchManager): the state-checked run of an action with
its history (``dispatch``) and what each action does through the VMM driver
(``operations``; system and disk snapshots: ``snapshots``). Imports ``core`` and ``vm``."""
