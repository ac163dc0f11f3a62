"""State on disk: checkpoints, weights keyed by global expert index, optimizer state. Below
parallel, train and hf, which all read and write through it; it imports none of them."""
