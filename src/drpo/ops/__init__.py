"""drpo.ops: memory-lean numerical kernels (sampled-token log-probabilities from the LM head)."""
from drpo.ops.logprob import chunked_logprobs, naive_logprobs, topk_logprobs

__all__ = ["chunked_logprobs", "naive_logprobs", "topk_logprobs"]
