"""Everything that knows about processes: meshes, expert-parallel dispatch, DDP/DeepSpeed plumbing."""
