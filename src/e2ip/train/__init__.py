"""Training: configuration schema, Lightning module, the `e2ip train` job."""
