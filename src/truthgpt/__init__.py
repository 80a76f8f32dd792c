"""truthgpt: GPT-style language models with distance-based attention.

score(i, j) = -λ_h · d(q_i, k_j) for d in L1, L2, squared L2, Chebyshev, Lp, plus cosine and
the dot-product baseline, causal and multi-head, with a learnable positive λ per head.
"""

__version__ = "0.1.0"
