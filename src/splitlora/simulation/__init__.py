"""Every party in one place: in this process (:mod:`.run`, :mod:`.inprocess`) or as Ray actors on one
trusted cluster (:mod:`.ray_backend`, :mod:`.ray_grid`)."""
