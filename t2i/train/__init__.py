"""Training: state, one step per family, the loop, data-parallel setup, run directories."""
