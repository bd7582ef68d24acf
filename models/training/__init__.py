"""`rnnserve train`: bundled tasks on offline data, the training loop and the CLI glue.

Training-only dependencies (Faker, Babel, statsmodels) come with the optional `train` extra and
are imported only when a task loads its data.
"""
