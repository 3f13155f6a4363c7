"""The fused output head: ``hidden @ weight.T`` to per-token log-probs, cross-entropy or a sequence objective,
without the ``(N, V)`` logits (see docs/ARCHITECTURE.md, ``kernels/head/``).

- :mod:`.linear_logprobs`: the recomputing op (4 products), the base of every loss.
- :mod:`.fused_linear_cross_entropy` and :mod:`.sequence_objective`: the gradient formed in the forward
  (3 products), per token and per group of rows; :mod:`._strategy` chooses between the two paths.
- :mod:`.grad_weight_sum`: grad-weight summed over chunks at fp32-equivalent accuracy.
- ``_linear_chunks`` (checks, masking, chunking, products), ``_row_softmax`` (the row passes),
  ``_cross_entropy_options``, ``_scale`` (the stored gradients): their pieces.
"""
