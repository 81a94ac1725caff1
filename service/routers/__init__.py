"""One router per area of the REST API; :mod:`service.main` assembles them."""
