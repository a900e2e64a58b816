"""Evaluation: pass@k / avg@k and the sample-and-score loop."""
from drpo.evaluation.metrics import EvalResult, GenerateFn, avg_at_k, evaluate, pass_at_k
from drpo.evaluation.run import heldout_metrics, make_generate_fn

__all__ = ["EvalResult", "GenerateFn", "avg_at_k", "evaluate", "pass_at_k", "heldout_metrics", "make_generate_fn"]
