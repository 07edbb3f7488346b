"""The mesh: nodes on one network finding each other (and, later, trading and gossiping)."""
