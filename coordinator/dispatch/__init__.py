"""Dispatch: attempts, racers, deferred commit and the post-commit relay."""
