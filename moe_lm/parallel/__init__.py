"""Everything that knows about processes: the layout (launch, accelerator, groups), applying
parallelism to a model (expert parallelism, DDP or DeepSpeed), and the backends that step it."""
