"""Training: optimizers, the train state, jitted sharded steps, the resumable phase loop."""
