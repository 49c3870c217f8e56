"""The demo trainer (``python -m launch.train``, ``python -m launch.train_hf``) and its support: the tasks
(``tasks.py``), the real SmolLM2 model (``models.py``), lm-evaluation-harness task configs (``lm_eval_tasks.py``),
the cluster launch files (``cluster/``). Run from the repository root (or with it on ``PYTHONPATH``)."""
