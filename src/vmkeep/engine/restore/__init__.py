"""Getting data back from a point: as a new VM or one disk (``point``), in place
(``inplace``), instantly on overlays (``instant``), file by file (``files``; the disk exposed
and mounted read-only by ``export``), with its memory (``memory``), and proving it boots
(``drill``). Imports ``core`` and ``vm``."""
