"""Who contributed what: the hash-chained audit log (and, later, signatures and the node registry)."""
