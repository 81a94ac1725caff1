"""One router per area of the REST API; :mod:`disalign.service.main` assembles them."""
