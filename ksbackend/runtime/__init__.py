"""State that lives across calls: the paged KV pool and its allocator, per-step batch metadata, the
forward context the attention op reads, and (on CUDA) the FlashInfer plans and decode CUDA graphs."""
