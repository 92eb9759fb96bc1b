"""Trains an image classifier (the victim ResNet-20, or the small CNN transfer source).

`train_and_evaluate(config, workdir)` resumes from <workdir>/checkpoints, reports accuracy on a
fixed test subset every `eval_every` steps and at the end, and writes the `classifier` section of
results.json. Other jobs restore the trained variables (parameters and BatchNorm statistics) with
`restore.load(workdir, 'classifier')`.
"""

import logging
from typing import Any, Callable, Dict, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sr_purify import classification_data as cdata
from sr_purify import models, reporting, sharding, training


def _split_variables(variables) -> Tuple[Any, Dict[str, Any]]:
    """flax variables -> (params, model_state): everything but params (e.g. batch_stats)."""
    variables = flax.core.unfreeze(variables)
    params = variables.pop('params')
    return params, variables


def init_variables_fn(model, image_shape) -> Callable[[jax.Array], Tuple[Any, Any]]:
    def init_variables(rng):
        x = jnp.zeros((1, *image_shape), jnp.float32)
        return _split_variables(model.init(rng, x, train=False))

    return init_variables


def make_loss_fn(model, label_smoothing: float = 0.0) -> training.LossFn:
    """Cross-entropy in training mode; BatchNorm statistics come back as the new model state.

    `label_smoothing` > 0 trains against (1 - s) one-hot + s / classes (Szegedy et al. 2016);
    the accuracy is always against the hard labels.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f'label_smoothing must be in [0, 1); got {label_smoothing}')

    def loss_fn(params, model_state, batch, rng):
        del rng  # No dropout; augmentation happens in the input pipeline.
        variables = {'params': params, **model_state}
        if model_state:
            logits, new_state = model.apply(
                variables, batch['image'], train=True, mutable=list(model_state)
            )
        else:
            logits, new_state = model.apply(variables, batch['image'], train=True), model_state
        logits = logits.astype(jnp.float32)
        if label_smoothing:
            targets = jax.nn.one_hot(batch['label'], logits.shape[-1])
            targets = optax.smooth_labels(targets, label_smoothing)
            loss = optax.softmax_cross_entropy(logits, targets).mean()
        else:
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
        return loss, (new_state, {'accuracy': accuracy})

    return loss_fn


def make_predict(model) -> Callable:
    """`(variables, images) -> logits` in inference mode (running BatchNorm statistics)."""
    return lambda variables, x: model.apply(variables, x, train=False)


def make_accuracy(predict: Callable, mesh, batch_size: int) -> Callable:
    """`(variables, split) -> {'accuracy', 'loss', 'examples'}`, every example counted once.

    One jitted function of a masked batch (compiled once: eval batches have a fixed shape).
    """

    def counts(variables, batch):
        logits = predict(variables, batch['image']).astype(jnp.float32)
        correct = (jnp.argmax(logits, -1) == batch['label']) * batch['mask']
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
        return jnp.stack([correct.sum(), (ce * batch['mask']).sum(), batch['mask'].sum()])

    counts = jax.jit(counts, out_shardings=sharding.replicated(mesh))

    def accuracy(variables, split: cdata.Split) -> Dict[str, float]:
        total = np.zeros(3, np.float64)
        for batch in cdata.eval_batches(
            split,
            global_batch=batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        ):
            total += np.asarray(jax.device_get(counts(variables, sharding.to_global(batch, mesh))))
        correct, loss, n = total
        return {'accuracy': correct / n, 'loss': loss / n, 'examples': int(n)}

    return accuracy


def load_data(config: ml_collections.ConfigDict) -> Tuple[cdata.Split, cdata.Split]:
    """(training subset, evaluation subset); class lists must agree."""
    data = config.data
    train = cdata.subset(
        cdata.load_split(data, data.train_split), data.train_examples, data.subset_seed
    )
    test = cdata.subset(
        cdata.load_split(data, data.eval_split), data.eval_examples, data.subset_seed
    )
    if train.class_names != test.class_names:
        raise ValueError(
            f'classes differ between {train.source!r} {train.class_names} and '
            f'{test.source!r} {test.class_names}'
        )
    num_classes = config.model.get('num_classes', 10)
    if len(train.class_names) != num_classes:
        raise ValueError(
            f'the data has {len(train.class_names)} classes, the model '
            f'{num_classes}; set --config.model.num_classes='
            f'{len(train.class_names)}'
        )
    return train, test


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, writer=None
) -> training.FitResult:
    """Trains, evaluates and reports; `writer` replaces the clu writer (tests record with it)."""
    reporting.check_workdir(workdir)
    reporting.write_config(workdir, config)
    model = models.build(config.model)
    train, test = load_data(config)
    logging.info(
        'classifier %s: %d training / %d evaluation images from %s',
        config.model.name,
        len(train),
        len(test),
        train.source,
    )
    mesh = sharding.make_mesh(config.get('mesh', [('data', -1)]))
    sharding.check_batch(config.eval_batch_size, mesh)
    accuracy = make_accuracy(make_predict(model), mesh, config.eval_batch_size)

    def batches(start_step):
        return cdata.train_batches(
            train,
            global_batch=config.batch_size,
            seed=config.seed,
            start_step=start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            pad=config.data.pad,
            flip=config.data.flip,
            prefetch=config.data.prefetch,
        )

    def evaluate(state, step):
        del step
        m = accuracy({'params': state.params, **state.model_state}, test)
        return {'eval/accuracy': m['accuracy'], 'eval/loss': m['loss']}

    writer = writer or reporting.create_writer(workdir)
    result = training.fit(
        config,
        workdir,
        init_variables=init_variables_fn(model, test.images.shape[1:]),
        loss_fn=make_loss_fn(model, config.get('label_smoothing', 0.0)),
        batches=batches,
        evaluate=evaluate,
        writer=writer,
    )
    if result.preempted:
        return result
    final = accuracy({'params': result.state.params, **result.state.model_state}, test)
    writer.write_scalars(
        result.step, {'eval/accuracy': final['accuracy'], 'eval/loss': final['loss']}
    )
    name = config.get('role', 'classifier')
    summary = {
        'model': config.model.to_dict(),
        'accuracy': final['accuracy'],
        'loss': final['loss'],
        'eval_examples': final['examples'],
        'eval_split': config.data.eval_split,
        'train_examples': len(train),
        'data': train.source,
        'params': models.parameter_count(result.state.params),
        'steps': result.step,
        'steps_per_sec': result.steps_per_sec,
        'wall_s': result.wall_s,
    }
    reporting.update_results(workdir, 'classifier', summary)
    table = reporting.log_table(
        f'{name} ({config.model.name}) after {result.step} steps',
        ['model', 'params', 'train images', 'eval images', 'accuracy', 'steps/s', 'wall s'],
        [
            [
                config.model.name,
                summary['params'],
                len(train),
                final['examples'],
                final['accuracy'],
                result.steps_per_sec,
                result.wall_s,
            ]
        ],
    )
    reporting.write_text(workdir, 'classifier_table.md', f'# {name}\n\n{table}')
    logging.info(
        '%s accuracy %.4f on %d %s images; %.2f steps/s',
        name,
        final['accuracy'],
        final['examples'],
        config.data.eval_split,
        result.steps_per_sec,
    )
    writer.flush()
    return result
