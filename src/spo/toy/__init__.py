"""The embedded toy world: captioned renders with hidden quality defects, a judge, tiny base models."""
