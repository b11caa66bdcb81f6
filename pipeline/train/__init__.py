"""Training on curated shards: curriculum loader, LR schedules, checkpoint averaging, trainer."""
