"""`loralag bench`: the paper's knowledge-intensive evaluation on LAMA T-REx. config (sizes, methods),
data (questions, training texts), run (train, build, answer, score), report (tables, findings, plots),
intervals (how far other questions, and other trainings of the task adapters, would move the scores).
"""
