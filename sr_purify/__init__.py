"""sr_purify: SR teacher/student distillation, adversarial attacks and self-supervised purification.

Layout: `models/` (flax.linen modules), `data.py` (tf.data input), `image_ops.py` (resize and
metrics), `losses.py` (pixel and distillation losses), `attacks/`, `trainers/` (one module per job,
each exposing `train_and_evaluate(config, workdir)`), `evaluators/`, plus the shared training pieces
`sharding.py`, `checkpointing.py`, `reporting.py`.
"""
