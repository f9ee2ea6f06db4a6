"""Input data: WebDataset shard reading and sample parsing, and the synthetic shapes set."""
