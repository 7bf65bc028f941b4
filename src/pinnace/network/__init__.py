"""Virtual networks between machines: one learning switch process per network (:mod:`.switch`)."""
