"""Measurement: perplexity, logits divergence, and size / KV-cache accounting."""
