"""Evaluation: HealthBench (rubric judge), medical multiple choice (loglik / generative), CMB-Clin, report card.

Modules: backends (ChatBackend, LoglikBackend, OpenAIChatBackend, TorchLoglik), healthbench_data / healthbench_score /
healthbench (HealthBench load, exact scoring, run), mcq_data / mcq / extract / stats (multiple choice), cmb
(CMB-Clin), report (report card), cli (`angelmed eval`), stub_server (offline OpenAI-compatible stub, not a judge).
"""
