"""Pipeline stages: one module per stage, plus the Stage protocol (``base``) and the registry."""
