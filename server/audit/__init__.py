"""Privacy audits: the accounting report of a run (what was promised and spent, checked for
consistency) and empirical audits that put a lower bound on epsilon with canaries."""
