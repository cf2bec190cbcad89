"""The tiers of a Dify installation, in the order deploy.all brings them up."""

from tasks.tiers import app, cache, db, dev_backend, dev_frontend, lb, logging, monitor, vector

# The home-lab development tiers come last: no host has their roles outside a home-lab inventory.
TIERS = (db.TIER, cache.TIER, vector.TIER, app.TIER, lb.TIER, monitor.TIER, logging.TIER,
         dev_backend.TIER, dev_frontend.TIER)
