"""What every job runs on: distributed start, the training loop, its outputs,
guards, checkpoints, metrics, pictures and the data it feeds."""
