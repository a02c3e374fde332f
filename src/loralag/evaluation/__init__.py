"""Scoring and evaluating: the KILT readers and scorer (kilt), answer cleaning shared by every evaluation
(answers), `loralag eval` (evaluate) and BM25 retrieval (retrieval).

Imports generation, routing and library; never an experiment.
"""
