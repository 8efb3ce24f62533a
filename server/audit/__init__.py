"""Privacy audits: the accounting report of a run (what was promised and spent, checked for
consistency) and the one-run epsilon lower bound; the empirical audits that train clients with
canaries to feed it are in :mod:`simulations.audits`."""
