"""The CIM objective: blockwise masking, the generator and enhancer composed
with the frozen tokenizer, and the diagnostics beside each loss."""
