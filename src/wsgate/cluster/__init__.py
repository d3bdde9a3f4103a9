"""Several gateway nodes as one: the broker between them (:mod:`.broker`, :mod:`.redis`)."""
