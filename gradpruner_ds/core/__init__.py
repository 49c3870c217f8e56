"""Pure tensor math of GradPruner on *local* tensors.

Nothing in this package imports torch.distributed, deepspeed, transformers or accelerate: every
function works on the piece of a tensor that the calling process holds (a whole tensor in one
process, a shard under ZeRO / FSDP2). Quantities that must be global are returned as partial sums
that add up exactly over disjoint shards; ``gradpruner_ds.consensus`` does the adding.
"""
